"""`--student-layers N` (issue #14 point 3): a pre-trained Hugging Face encoder cut to its first N transformer
layers is the student of distill, train and sweep; its best/ is an N-layer teacher folder, the flag is recorded
and resumed, and it is one line where it cannot apply."""

from __future__ import annotations

import json

import pytest
import torch

from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
from helpers import _metrics, _one_error_line, run_cli
from teachers_for_tests import make_tiny_encoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, tiny_tokenizer):
    """The pre-trained encoder: a bare 4-layer BERT (no head), as the sentence-transformers MiniLM folder is."""
    return make_tiny_encoder(tmp_path_factory.mktemp("encoder") / "bert-4", tiny_tokenizer, layers=4)


def _distill(cache, student, out, *extra):
    return ["distill", "--cache", cache, "--student", student, "--epochs", "2", "--batch-size", "16", "--lr", "1e-3",
            "--out", out, "--device", "cpu", "--no-progress", "--num-workers", "0", *extra]


def _encoder_weights(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder)).state_dict()


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")} for r in rows]


def test_distill_student_layers_starts_from_the_encoders_first_layers(tmp_path, capsys, monkeypatch, sst2_cache,
                                                                      sst2_copy, encoder):
    """A run whose one step moves no weight (lr 1e-30) keeps the student as built: best/ holds 2 layers, and they
    are the pre-trained folder's first 2; cache-teacher reads best/ back as a 2-layer teacher (a TAKD assistant)."""
    out = tmp_path / "run"
    code, stdout, err = run_cli(_distill(sst2_cache, encoder, out, "--student-layers", "2", "--epochs", "1",
                                         "--lr", "1e-30", "--method", "ce"), capsys, monkeypatch)
    assert code == 0, err
    assert "(first 2 layers)" in stdout
    assert json.loads((out / "summary.json").read_text())["student_layers"] == 2
    assert json.loads((out / "config.json").read_text())["config"]["student_layers"] == 2
    best = json.loads((out / "best" / "config.json").read_text())
    assert best["num_hidden_layers"] == 2 and best["architectures"] == ["BertForSequenceClassification"]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(out / "best"))
    assert len(model.bert.encoder.layer) == 2
    pretrained, kept = _encoder_weights(encoder), model.bert.state_dict()
    assert not [k for k in kept if k.startswith("encoder.layer.") and k.split(".")[2] not in ("0", "1")]
    for name, tensor in kept.items():  # an Adam step of 1e-30 moves a weight by at most ~1e-30
        assert torch.allclose(tensor, pretrained[name], rtol=0, atol=1e-20), name
    deeper = "encoder.layer.1.attention.self.query.weight"
    assert not torch.allclose(kept[deeper], pretrained[deeper.replace("layer.1", "layer.3")], atol=1e-3)
    # the saved student is a teacher folder of 2 layers: the next hop of a chain
    from kdcache.cache.info import describe_cache

    again = cache_teacher(CacheTeacherConfig(teacher=str(out / "best"), task="sst2", data=str(sst2_copy),
                                             out=tmp_path / "ta.kdcache", splits=("validation",), batch_size=16,
                                             device="cpu", progress=False))
    assert describe_cache(again)["teacher"]["parameters"] == model.num_parameters()


def test_a_truncated_student_trains_and_resumes_where_an_uninterrupted_run_ends(tmp_path, capsys, monkeypatch,
                                                                                sst2_cache, encoder):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli(_distill(sst2_cache, encoder, full, "--student-layers", "2"), capsys, monkeypatch)[0] == 0
    assert run_cli(_distill(sst2_cache, encoder, cut, "--student-layers", "2", "--stop-after-epoch", "1"),
                   capsys, monkeypatch)[0] == 0
    assert len(_metrics(cut)) == 1
    # a resume must rebuild the same truncated student: without the flag it is another run
    _one_error_line(*run_cli(_distill(sst2_cache, encoder, cut, "--resume"), capsys, monkeypatch)[::2],
                    "checkpoint of another run", "config.student_layers")
    code, _, err = run_cli(_distill(sst2_cache, encoder, cut, "--student-layers", "2", "--resume"), capsys, monkeypatch)
    assert code == 0, err
    assert _strip(_metrics(cut)) == _strip(_metrics(full))
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["complete"] and summary["student_layers"] == 2
    from transformers import AutoModelForSequenceClassification

    a, b = (AutoModelForSequenceClassification.from_pretrained(str(run / "best")).state_dict() for run in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max(int(k.split(".")[3]) for k in a if k.startswith("bert.encoder.layer.")) == 1  # 2 layers
    # it trained: the kept layers moved away from the pre-trained ones
    pretrained = _encoder_weights(encoder)
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(a[f"bert.{name}"], pretrained[name])


@pytest.mark.parametrize("extra, needles", [
    (["--student-layers", "0"], ["--student-layers must be at least 1, got 0"]),
    (["--student-layers", "5"], ["--student-layers 5", "has 4 transformer layers", "1 to 4"]),
])
def test_student_layers_outside_the_encoders_depth_are_one_line(tmp_path, capsys, monkeypatch, sst2_cache, encoder,
                                                                 extra, needles):
    out = tmp_path / "run"
    _one_error_line(*run_cli(_distill(sst2_cache, encoder, out, *extra), capsys, monkeypatch)[::2], *needles)
    assert not out.exists()  # refused before the run folder is made


def test_student_layers_without_a_pretrained_folder_are_one_line(tmp_path, capsys, monkeypatch, sst2_cache,
                                                                   bert_student_config):
    for student, what in ((str(bert_student_config), "a config file"), ("resnet8", "an architecture name")):
        out = tmp_path / what.replace(" ", "-")
        _one_error_line(*run_cli(_distill(sst2_cache, student, out, "--student-layers", "2"), capsys,
                                 monkeypatch)[::2], "--student-layers", "pre-trained Hugging Face model folder",
                        student, what)
        assert not out.exists()


def test_train_student_layers_is_the_same_student_without_a_teacher(tmp_path, capsys, monkeypatch, sst2_copy,
                                                                     encoder):
    """The scratch baseline of a truncated student: `train --model ENCODER --student-layers 2`."""
    out = tmp_path / "train"
    code, stdout, err = run_cli(["train", "--model", encoder, "--student-layers", "2", "--task", "sst2", "--data",
                                 sst2_copy, "--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--out", out,
                                 "--device", "cpu", "--no-progress", "--num-workers", "0"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((out / "best" / "config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((out / "summary.json").read_text())["student_layers"] == 2
    _one_error_line(*run_cli(["train", "--model", "mlp", "--student-layers", "2", "--task", "digits", "--out",
                              tmp_path / "mlp", "--device", "cpu", "--no-progress"], capsys, monkeypatch)[::2],
                    "--student-layers", "student mlp is an architecture name")


def test_sweep_passes_student_layers_through_and_can_vary_them(tmp_path, capsys, monkeypatch, sst2_cache, encoder):
    common = ["sweep", "--cache", sst2_cache, "--student", encoder, "--epochs", "1", "--batch-size", "16", "--lr",
              "1e-3", "--device", "cpu", "--no-progress", "--num-workers", "0"]
    out = tmp_path / "grid"
    code, _, err = run_cli([*common, "--out", out, "--grid", "student-layers=1,3"], capsys, monkeypatch)
    assert code == 0, err
    for n in (1, 3):
        run = out / f"student-layers-{n}_seed-0"
        assert json.loads((run / "summary.json").read_text())["student_layers"] == n
        assert json.loads((run / "best" / "config.json").read_text())["num_hidden_layers"] == n
    out = tmp_path / "flag"
    code, _, err = run_cli([*common, "--out", out, "--student-layers", "2", "--seeds", "0"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((out / "seed-0" / "best" / "config.json").read_text())["num_hidden_layers"] == 2
