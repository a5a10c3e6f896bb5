"""Issue 22, point 3's curricula on a token-level cache: Pro-KD from an LM teacher's checkpoints and curriculum
extraction from per-token projections of its hidden states.

`train --task lm --save-every N` keeps the checkpoints; `cache-teacher --task lm --checkpoints ... --hidden-layers
L1,L2 --proj-dim D` stores each checkpoint's logits [N, S, C] and each layer's projection [N, S, D], equal to the
models' own outputs on the stored windows (0 past a window's length), and resumes to the same bytes; `distill
--method prokd|curriculum` trains a causal-LM student on them, the projection phases masked over padding."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import kdcache
from helpers import LM_CORPUS, _metrics, _one_error_line, interrupt_autocast_at, kdcache_processes, run_cli, write_lm_corpus
from teachers_for_tests import make_tiny_gpt2

CORPUS = LM_CORPUS
SEQ = 16
DIM = 8
GPT = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 32}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_lm_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "gpt2-2layer.json"
    path.write_text(json.dumps(GPT), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, config):
    """A 2-layer GPT teacher trained for 3 epochs, keeping a checkpoint after each (`--save-every 1`)."""
    from kdcache.recipes.train_lm import TrainLMConfig, train_lm

    tokenizer = make_tiny_gpt2(tmp_path_factory.mktemp("tok"), CORPUS, vocab_size=300, positions=32)
    out = tmp_path_factory.mktemp("gpt") / "run"
    train_lm(TrainLMConfig(model=str(config), tokenizer=str(tokenizer), data=str(corpus), out=out, seq_len=SEQ,
                           epochs=3, batch_size=8, lr=3e-3, device="cpu", progress=False, save_every=1))
    return out


def _capture(out, trained, corpus, *, splits=("train", "validation"), **extra):
    from kdcache.data import DataOptions
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher

    cache_teacher(CacheTeacherConfig(teacher=str(trained / "model"), task="lm", data=str(corpus), splits=splits,
                                     out=out, device="cpu", progress=False, dtype="float32", batch_size=5,
                                     checkpoints=(str(trained / "checkpoints" / "epoch-*"),), hidden_layers="1,2",
                                     proj_dim=DIM, proj_seed=3, data_options=DataOptions(seq_len=SEQ), **extra))
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory, trained, corpus):
    """Top-8 targets of the trained teacher, its three checkpoints' dense logits, and projections of layers 1, 2."""
    return _capture(tmp_path_factory.mktemp("cache") / "c.kdcache", trained, corpus, topk=8)


def _own_outputs(folder, ids: np.ndarray, lengths: np.ndarray):
    """A model's own logits [N, S, C] and hidden states (per layer, [N, S, H]) on the stored windows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(lengths.astype(np.int64))[:, None]
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=mask.long(),
                    output_hidden_states=True)
    return out.logits.float(), out.hidden_states, mask


def test_train_task_lm_keeps_a_checkpoint_every_n_epochs(trained):
    folders = sorted((trained / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["epoch-0001", "epoch-0002", "epoch-0003"]
    rows = _metrics(trained)
    for folder, row in zip(folders, rows):
        marker = json.loads((folder / "kdcache-checkpoint.json").read_text())
        assert marker["epoch"] == row["epoch"] and marker["metric"] == pytest.approx(row["val_perplexity"])
        assert (folder / "tokenizer.json").is_file()
    # the last checkpoint is the trained model
    from safetensors.torch import load_file

    last, model = (load_file(str(f / "model.safetensors")) for f in (folders[-1], trained / "model"))
    assert all(torch.equal(last[k], model[k]) for k in model)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_checkpoints_and_projections_are_the_models_own_outputs_per_token(cache, trained, split):
    from kdcache.models.hidden import TOKEN_RULE, projection_matrix

    got = kdcache.open_cache(cache, split)
    ids, lengths = got.read("input_ids"), got.read("lengths")
    # the train stream's last window is shorter: padding is there to be zeroed (the validation stream fills its last)
    assert (lengths < SEQ).any() == (split == "train")
    entries = got.checkpoints
    assert [e["name"] for e in entries] == ["epoch-0001", "epoch-0002", "epoch-0003", "model"]
    assert [e["epoch"] for e in entries[:3]] == [1, 2, 3] and entries[-1]["array"] == "logits"
    for entry in entries[:3]:
        logits, _, mask = _own_outputs(trained / "checkpoints" / entry["name"], ids, lengths)
        stored = torch.from_numpy(got.read(entry["array"]))
        assert stored.shape == (len(got), SEQ, 300)
        torch.testing.assert_close(stored[mask], logits[mask], rtol=1e-5, atol=1e-5)
        assert (stored[~mask] == 0).all()
    _, states, mask = _own_outputs(trained / "model", ids, lengths)
    projections = got.projections
    assert projections["layers"] == [1, 2] and projections["dim"] == DIM and projections["pooling"] == TOKEN_RULE
    for layer in (1, 2):
        matrix = torch.from_numpy(projection_matrix(3, layer, GPT["n_embd"], DIM))
        stored = torch.from_numpy(got.read(f"hidden_{layer}"))
        assert stored.shape == (len(got), SEQ, DIM)
        torch.testing.assert_close(stored[mask], (states[layer] @ matrix)[mask], rtol=1e-4, atol=1e-5)
        assert (stored[~mask] == 0).all()


def test_an_interrupted_capture_of_checkpoints_and_projections_resumes_to_the_same_bytes(tmp_path, trained, corpus,
                                                                                          monkeypatch):
    from kdcache.errors import Interrupted

    reference = _capture(tmp_path / "ref.kdcache", trained, corpus, splits=("train",), chunk_rows=4)
    interrupt_autocast_at(monkeypatch, 6)  # batch 5 (rows 20-24), after chunks 0-4 (rows 0-19) were stored
    with pytest.raises(Interrupted, match="rows 0-19 are stored"):
        _capture(tmp_path / "c.kdcache", trained, corpus, splits=("train",), chunk_rows=4)
    monkeypatch.undo()
    out = _capture(tmp_path / "c.kdcache", trained, corpus, splits=("train",), chunk_rows=4)
    ref, got = kdcache.open_cache(reference, "train"), kdcache.open_cache(out, "train")
    assert got.names == ref.names and {"checkpoint_0", "checkpoint_2", "hidden_1", "hidden_2"} <= set(got.names)
    for name in got.names:
        assert np.array_equal(got.read(name), ref.read(name)), name
    assert got.chunk_digests == ref.chunk_digests


def _distill(cache, student, out, *extra):
    return ["distill", "--cache", cache, "--student", student, "--out", out, "--batch-size", "8", "--device", "cpu",
            "--no-progress", "--num-workers", "0", *extra]


def test_prokd_follows_the_checkpoints_per_token(tmp_path, cache, config, capsys, monkeypatch):
    out = tmp_path / "run"
    code, _, err = run_cli(_distill(cache, config, out, "--method", "prokd", "--epochs", "4"), capsys, monkeypatch)
    assert code == 0, err
    rows = _metrics(out)
    assert [r["checkpoint"] for r in rows] == ["epoch-0001", "epoch-0002", "epoch-0003", "model"]
    assert all(math.isfinite(r["loss"]) and r["metric"] == r["perplexity"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["metric_name"] == "perplexity" and summary["best_perplexity"] > 0


def test_curriculum_fits_the_students_layers_per_token_then_the_targets(tmp_path, cache, config, capsys, monkeypatch):
    out = tmp_path / "run"
    code, _, err = run_cli(_distill(cache, config, out, "--method", "curriculum", "--epochs", "3", "--phase-epochs",
                                    "1"), capsys, monkeypatch)
    assert code == 0, err
    rows = _metrics(out)
    assert [r["phase"] for r in rows] == [1, 2, 3] and [r["layer"] for r in rows[:2]] == ["1->1", "2->2"]
    assert all(math.isfinite(r["loss"]) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["best_epoch"] == 3  # only the logits phase competes for best/


def test_without_checkpoints_or_projections_prokd_and_curriculum_are_one_line(tmp_path, trained, corpus, config,
                                                                              capsys, monkeypatch):
    from kdcache.data import DataOptions
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher

    plain = tmp_path / "plain.kdcache"
    cache_teacher(CacheTeacherConfig(teacher=str(trained / "model"), task="lm", data=str(corpus),
                                     splits=("train", "validation"), out=plain, device="cpu", progress=False,
                                     topk=8, data_options=DataOptions(seq_len=SEQ)))
    for method, needle in (("prokd", "stores no teacher checkpoints"), ("curriculum", "no hidden-state projections")):
        code, _, err = run_cli(_distill(plain, config, tmp_path / method, "--method", method, "--epochs", "3"),
                               capsys, monkeypatch)
        _one_error_line(code, err, needle)


def test_the_projection_loss_averages_real_positions_and_ignores_padding():
    from kdcache.methods import losses
    from kdcache.methods.curriculum import TokenProjection

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    lengths = torch.tensor([5, 2, 3])
    real = TokenProjection(student, lengths).real()
    assert real.sum() == 10 and not real[1, 2:].any()
    value = losses.token_projection_loss(student, teacher, real)
    # the per-row loss of the real positions' rows
    assert value == pytest.approx(float(losses.projection_loss(student[real], teacher[real])))
    # anything at a padded position, student's or teacher's, changes nothing
    noisy_s, noisy_t = student.clone(), teacher.clone()
    noisy_s[~real], noisy_t[~real] = 1e3, -1e3
    assert float(losses.token_projection_loss(noisy_s, noisy_t, real)) == pytest.approx(float(value))
    # and the gradient reaches the real positions only
    leaf = student.clone().requires_grad_()
    losses.token_projection_loss(leaf, teacher, real).backward()
    assert (leaf.grad[~real] == 0).all() and (leaf.grad[real] != 0).any()


@pytest.mark.parametrize("method, args", [
    ("curriculum", ("--epochs", "3", "--phase-epochs", "1")),  # cut inside the projection phases: the heads travel
    ("prokd", ("--epochs", "4")),  # cut between two checkpoints
])
def test_a_resumed_lm_curriculum_ends_where_an_uninterrupted_one_does(tmp_path, cache, config, capsys, monkeypatch,
                                                                      method, args):
    from safetensors.torch import load_file

    args = ("--method", method, *args)
    assert run_cli(_distill(cache, config, tmp_path / "full", *args), capsys, monkeypatch)[0] == 0
    cut = tmp_path / "cut"
    assert run_cli(_distill(cache, config, cut, *args, "--stop-after-epoch", "1"), capsys, monkeypatch)[0] == 0
    code, _, err = run_cli(_distill(cache, config, cut, *args, "--resume"), capsys, monkeypatch)
    assert code == 0, err
    timing = ("seconds", "samples_per_second", "tokens_per_second", "eval_tokens_per_second")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(_metrics(cut)) == strip(_metrics(tmp_path / "full"))
    full, resumed = (load_file(run / "best" / "model.safetensors") for run in (tmp_path / "full", cut))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_verify_and_info_read_an_lm_cache_with_checkpoints_and_projections(cache, capsys, monkeypatch):
    code, out, err = run_cli(["verify", cache], capsys, monkeypatch)
    assert code == 0, err
    code, out, err = run_cli(["info", cache, "--json"], capsys, monkeypatch)
    assert code == 0, err
    info = json.loads(out)
    assert info["hidden_projections"]["dim"] == DIM and len(info["checkpoints"]) == 4


def test_a_method_without_a_per_token_loss_is_one_line_on_an_lm_cache():
    """Every built-in method trains causal-LM students; one that does not declare a per-token loss is refused."""
    from types import SimpleNamespace

    from kdcache.errors import KDCacheError
    from kdcache.methods import METHODS
    from kdcache.methods.base import Method
    from kdcache.train.run import check_lm_method

    assert all(m.per_token for m in METHODS.values())

    class PerRowOnly(Method):
        name = "per-row-only"

    cfg = SimpleNamespace(cache="c.kdcache", method="per-row-only", student_kwargs=None)
    with pytest.raises(KDCacheError, match="--method per-row-only does not train causal-LM students"):
        check_lm_method(PerRowOnly(), cfg, None)


def test_bad_checkpoints_or_layers_of_an_lm_teacher_are_one_line(tmp_path, trained, corpus, capsys, monkeypatch):
    import shutil

    other = make_tiny_gpt2(tmp_path / "other", [d.upper() for d in CORPUS], vocab_size=300, positions=32)
    foreign = tmp_path / "foreign" / "epoch-0001"
    shutil.copytree(trained / "checkpoints" / "epoch-0001", foreign)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (other / name).is_file():
            shutil.copy(other / name, foreign / name)
    out = tmp_path / "c.kdcache"
    base = ["cache-teacher", "--task", "lm", "--teacher", trained / "model", "--data", corpus, "--out", out,
            "--seq-len", str(SEQ), "--device", "cpu", "--no-progress"]
    cases = [
        ((*base, "--checkpoints", foreign), ("epoch-0001: the checkpoint's tokenizer", "one training run")),
        ((*base, "--checkpoints", other), ("checkpoint has another architecture",)),
        ((*base, "--hidden-layers", "3", "--proj-dim", "4"), ("has layers 0..2; layer 3 does not exist",)),
        ((*base, "--hidden-layers", "2"), ("--hidden-layers needs --proj-dim",)),
    ]
    for args, needles in cases:
        code, _, err = run_cli(list(args), capsys, monkeypatch)
        _one_error_line(code, err, *needles)
        assert not out.exists(), args


def test_without_a_teacher_the_last_lm_checkpoint_is_the_teacher(tmp_path, trained, corpus):
    from kdcache.data import DataOptions
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher

    out = tmp_path / "c.kdcache"
    cache_teacher(CacheTeacherConfig(teacher=None, task="lm", data=str(corpus), splits=("validation",), out=out,
                                     device="cpu", progress=False, dtype="float32", batch_size=5,
                                     checkpoints=(str(trained / "checkpoints" / "epoch-*"),),
                                     data_options=DataOptions(seq_len=SEQ)))
    got = kdcache.open_cache(out, "validation")
    assert [(e["name"], e["array"]) for e in got.checkpoints] == [
        ("epoch-0001", "checkpoint_0"), ("epoch-0002", "checkpoint_1"), ("epoch-0003", "logits")]
    ids, lengths = got.read("input_ids"), got.read("lengths")
    logits, _, mask = _own_outputs(trained / "checkpoints" / "epoch-0003", ids, lengths)
    torch.testing.assert_close(torch.from_numpy(got.read("logits"))[mask], logits[mask], rtol=1e-5, atol=1e-5)
    assert got.header.tokens.tokenizer_sha256 and got.target.positions == SEQ


@pytest.mark.slow
def test_two_processes_store_the_checkpoints_and_projections_one_process_stores(tmp_path, trained, corpus):
    def capture(nproc: int, out) -> None:
        kdcache_processes(nproc, [
            "cache-teacher", "--task", "lm", "--teacher", trained / "model", "--data", corpus, "--out", out,
            "--seq-len", SEQ, "--device", "cpu", "--no-progress", "--batch-size", 5, "--split", "train",
            "--checkpoints", trained / "checkpoints" / "epoch-*", "--hidden-layers", "1,2", "--proj-dim", DIM,
            "--topk", 3, "--chunk-rows", 4])

    capture(1, tmp_path / "one.kdcache")
    capture(2, tmp_path / "two.kdcache")
    one, two = (kdcache.open_cache(tmp_path / name, "train") for name in ("one.kdcache", "two.kdcache"))
    assert one.names == two.names and {"checkpoint_0", "hidden_2"} <= set(one.names)
    for name in one.names:
        assert np.array_equal(one.read(name), two.read(name)), name
    assert one.chunk_digests == two.chunk_digests


def test_one_lm_checkpoint_distils_alone_and_its_perplexity_is_the_teachers_column(tmp_path, cache, config, capsys,
                                                                                   monkeypatch):
    """Checkpoint search on tokens: `--checkpoint NAME` reads that checkpoint's dense logits per token, and the
    teacher's perplexity beside the student's is that checkpoint's (a top-k cache's trained teacher has none)."""
    from kdcache.data.lm import next_token_targets

    out = tmp_path / "run"
    code, _, err = run_cli(_distill(cache, config, out, "--method", "vanilla", "--checkpoint", "epoch-0001",
                                    "--epochs", "1"), capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_array"] == "checkpoint_0"
    val = kdcache.open_cache(cache, "validation")
    ids, lengths, labels = (torch.from_numpy(val.read(n).astype(np.int64)) for n in ("input_ids", "lengths", "labels"))
    y = next_token_targets(ids, lengths, labels, ignore=-1)
    log_p = torch.log_softmax(torch.from_numpy(val.read("checkpoint_0")).double(), -1)
    ce = -log_p.gather(-1, y.clamp(min=0)[..., None])[..., 0][y >= 0].mean()
    assert summary["teacher_metric"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    code, _, err = run_cli(_distill(cache, config, tmp_path / "trained", "--method", "vanilla", "--epochs", "1"),
                           capsys, monkeypatch)
    assert code == 0 and json.loads((tmp_path / "trained" / "summary.json").read_text())["teacher_metric"] is None


def test_train_task_lm_save_every_from_the_cli(tmp_path, trained, corpus, config, capsys, monkeypatch):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--task", "lm", "--model", config, "--tokenizer", trained / "model", "--data",
                            corpus, "--seq-len", str(SEQ), "--epochs", "2", "--save-every", "2", "--batch-size", "8",
                            "--device", "cpu", "--no-progress", "--out", out], capsys, monkeypatch)
    assert code == 0, err
    assert [f.name for f in (out / "checkpoints").iterdir()] == ["epoch-0002"]
    assert json.loads((out / "checkpoints" / "epoch-0002" / "kdcache-checkpoint.json").read_text())["epoch"] == 2
