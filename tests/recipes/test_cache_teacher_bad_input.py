"""Issue 2, "Bad input": through the `kdcache` entry point, every bad input named there gives one line
`error: ...` naming the file and the problem, exit status 1, and never a cache that looks complete."""

from __future__ import annotations

import errno
import json
import pickle

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import kdcache
from kdcache.errors import KDCacheError
from kdcache.models import resnet8
from teachers_for_tests import make_tiny_bert
from helpers import read_root_attrs, run_cli, write_tsv

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------------------------------------- helpers


def assert_bad_input(code, err, out_path, *needles):
    """Exit 1, exactly one `error:` line holding every needle, and nothing at `out_path` that looks complete."""
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    attrs = read_root_attrs(out_path) if out_path.exists() else None
    assert attrs is None or attrs.get("complete") is not True, f"{out_path} looks complete after: {lines[0]}"
    if out_path.exists():
        with pytest.raises(KDCacheError):
            kdcache.open_cache(out_path)
    return lines[0]


@pytest.fixture(scope="module")
def bert2(tmp_path_factory, tiny_tokenizer):
    return make_tiny_bert(tmp_path_factory.mktemp("bert2"), tiny_tokenizer, num_labels=2)


@pytest.fixture(scope="module")
def bert3(tmp_path_factory, tiny_tokenizer):
    return make_tiny_bert(tmp_path_factory.mktemp("bert3"), tiny_tokenizer, num_labels=3)


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet8.pt"
    torch.save(resnet8(10).state_dict(), path)
    return path


def write_cifar10(folder, labels=(0, 1, 2, 3)):
    """A CIFAR-10 python-pickle folder in the published layout, four random images per batch."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": rows, b"labels": list(labels)}))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in CIFAR10_CLASSES]}))
    return folder


class ConstantLogits(nn.Module):
    """A broken teacher: a linear layer whose outputs are replaced by `value` from row `from_row` of a batch on."""

    def __init__(self, num_classes: int = 10, value: float = float("inf"), from_row: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(64, num_classes)
        self.value, self.from_row = value, from_row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x.flatten(1))
        if len(out) > self.from_row:  # the two-row probe passes; the cached run does not
            out = out.clone()
            out[self.from_row:, 0] = self.value
        return out


def inf_teacher(num_classes: int = 10) -> nn.Module:
    return ConstantLogits(num_classes, float("inf"))


def huge_teacher(num_classes: int = 10) -> nn.Module:
    return ConstantLogits(num_classes, 1e6)


def _digits(teacher, weights, out, *extra):
    return ["cache-teacher", "--teacher", teacher, "--weights", weights, "--task", "digits", "--split", "train",
            "--out", out, "--no-progress", "--trust-model-code", *extra]


# ---------------------------------------------------------------------------------------------- missing files

def test_missing_glue_split_file(tmp_path, capsys, monkeypatch, bert2):
    folder = write_tsv(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"], ["good film", "1"]]).parent
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", bert2, "--task", "sst2", "--data", folder, "--split", "train",
                            "--split", "validation", "--out", out, "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, folder / "dev.tsv", "missing")
    assert not out.exists()  # found before anything was written


def test_missing_text_file(tmp_path, capsys, monkeypatch, bert2):
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", bert2, "--task", "text", "--data", tmp_path / "gone.jsonl",
                            "--text-column", "t", "--out", out, "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, tmp_path / "gone.jsonl", "no such file")
    assert not out.exists()


@pytest.mark.parametrize("teacher", ["./no-such-model", "models/no-such-model"])
def test_missing_teacher_folder_is_named_before_the_data(tmp_path, capsys, monkeypatch, glue_dir, teacher):
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", teacher, "--task", "sst2", "--data", glue_dir / "SST-2",
                            "--out", out, "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, teacher, "no such teacher folder")
    assert "tokenizer" not in err  # not a misleading complaint about the tokenizer
    assert not out.exists()


def test_text_task_with_an_unknown_bare_teacher_name(tmp_path, capsys, monkeypatch, glue_dir):
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", "bert-sst2", "--task", "sst2", "--data", glue_dir / "SST-2",
                            "--out", out, "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, "bert-sst2", "no such teacher folder", "Hugging Face model folder")


def test_a_weights_file_given_as_the_teacher(tmp_path, capsys, monkeypatch, resnet_weights):
    data = write_cifar10(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", resnet_weights, "--task", "cifar10", "--data", data,
                            "--out", out, "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, resnet_weights, "is a file", "--weights")


def test_missing_weights_file(tmp_path, capsys, monkeypatch):
    data = write_cifar10(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", "resnet8", "--weights", tmp_path / "gone.pt", "--task",
                            "cifar10", "--data", data, "--out", out, "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, tmp_path / "gone.pt", "no such weights file")
    assert not out.exists()


def test_weights_file_that_is_not_a_state_dict(tmp_path, capsys, monkeypatch):
    data = write_cifar10(tmp_path / "cifar-10-batches-py")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", "resnet8", "--weights", junk, "--task", "cifar10", "--data",
                            data, "--out", out, "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, junk, "not a readable PyTorch state dict")


def test_missing_cifar_batch_file(tmp_path, capsys, monkeypatch, resnet_weights):
    data = write_cifar10(tmp_path / "cifar-10-batches-py")
    (data / "data_batch_3").unlink()
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", "resnet8", "--weights", resnet_weights, "--task", "cifar10",
                            "--data", data, "--out", out, "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, data / "data_batch_3", "missing")
    assert not out.exists()


@pytest.mark.parametrize("task", ["cifar10", "cifar100", "imagefolder"])
def test_missing_image_data(tmp_path, capsys, monkeypatch, resnet_weights, task):
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", "resnet8", "--weights", resnet_weights, "--task", task,
                            "--data", tmp_path / "nowhere", "--out", out, "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, tmp_path / "nowhere", "no such")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- unknown names

def test_unknown_task_writes_nothing(tmp_path, capsys, monkeypatch, bert2):
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", bert2, "--task", "glue", "--data", tmp_path, "--out", out,
                            "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, "unknown task 'glue'", "sst2", "cifar10", "imagefolder", "text")
    assert not out.exists()


def test_unknown_split_names_the_folder(tmp_path, capsys, monkeypatch, bert2, glue_dir):
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", bert2, "--task", "sst2", "--data", glue_dir / "SST-2",
                            "--split", "devset", "--out", out, "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, glue_dir / "SST-2", "unknown sst2 split 'devset'", "validation")


@pytest.mark.parametrize("flag,column", [("--text-column", "text"), ("--text-pair-column", "hypothesis"),
                                         ("--label-column", "gold")])
def test_unknown_column_names(tmp_path, capsys, monkeypatch, bert2, flag, column):
    data = write_tsv(tmp_path / "pairs.tsv", [["premise", "claim", "label"], ["a film", "the film", "1"]])
    flags = {"--text-column": "premise", "--text-pair-column": "claim", "--label-column": "label", flag: column}
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", bert2, "--task", "text", "--data", data,
                            *[x for kv in flags.items() for x in kv], "--out", out, "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, data, f"no column {column!r}", "premise, claim, label")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- labels and width

def test_integer_label_outside_the_teachers_outputs(tmp_path, capsys, monkeypatch, bert2):
    data = write_tsv(tmp_path / "stars.tsv", [["review", "stars"], ["good film", "1"], ["bad film", "0"],
                                              ["odd film", "7"]])
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", bert2, "--task", "text", "--data", data, "--text-column",
                            "review", "--label-column", "stars", "--out", out, "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, data, "label 7 is outside the 2 outputs", bert2)
    assert not out.exists()


def test_cifar_label_outside_the_teachers_outputs(tmp_path, capsys, monkeypatch, resnet_weights):
    data = write_cifar10(tmp_path / "cifar-10-batches-py", labels=(0, 1, 12, 3))
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", "resnet8", "--weights", resnet_weights, "--task", "cifar10",
                            "--data", data, "--out", out, "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, data / "data_batch_1", "labels outside 0..9")
    assert not out.exists()


def test_regression_task_with_a_classifier_teacher(tmp_path, capsys, monkeypatch, bert2):
    head = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    folder = write_tsv(tmp_path / "STS-B" / "train.tsv",
                       [head, ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "a film", "the film",
                               "4.250"]]).parent
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", bert2, "--task", "stsb", "--data", folder, "--out", out,
                            "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, bert2, "has 2 outputs", "stsb is a regression (needs 1)")
    assert not out.exists()


def test_three_way_task_with_a_two_output_teacher(tmp_path, capsys, monkeypatch, bert2):
    head = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    folder = write_tsv(tmp_path / "MNLI" / "train.tsv",
                       [head, ["0", "1", "1e", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)", "a film", "no film",
                               "contradiction", "contradiction"]]).parent
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", bert2, "--task", "mnli", "--data", folder, "--out", out,
                            "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, "has 2 outputs", folder / "train.tsv", "has 3 labels",
                     "entailment, neutral, contradiction")


def test_image_teacher_of_another_width(tmp_path, capsys, monkeypatch):
    data = write_cifar10(tmp_path / "cifar-10-batches-py")
    weights = tmp_path / "resnet8-5way.pt"
    torch.save(resnet8(5).state_dict(), weights)
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", "resnet8", "--weights", weights, "--task", "cifar10",
                            "--data", data, "--out", out, "--no-progress"], capsys, monkeypatch)
    assert_bad_input(code, err, out, weights, "shape mismatch", "(5,", "(10,")


# ---------------------------------------------------------------------------------------------- NaN, Inf, overflow

@pytest.mark.parametrize("factory", ["teachers_for_tests:nan_teacher", "test_cache_teacher_bad_input:inf_teacher"])
def test_nan_or_inf_names_the_data_and_leaves_the_cache_incomplete(tmp_path, capsys, monkeypatch, factory):
    weights = tmp_path / "broken.pt"
    module, name = factory.split(":")
    torch.save(getattr(__import__(module), name)().state_dict(), weights)
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(_digits(factory, weights, out), capsys, monkeypatch)
    line = assert_bad_input(code, err, out, "sklearn.datasets.load_digits", "split 'train'", "NaN or Inf",
                            f"{out} is left incomplete")
    assert "source index" in line
    assert read_root_attrs(out)["complete"] is False
    code, stdout, _ = run_cli(["info", out, "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(stdout)["complete"] is False


def test_float16_overflow_is_refused_and_float32_accepted(tmp_path, capsys, monkeypatch):
    weights = tmp_path / "huge.pt"
    torch.save(huge_teacher().state_dict(), weights)
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(_digits("test_cache_teacher_bad_input:huge_teacher", weights, out), capsys, monkeypatch)
    assert_bad_input(code, err, out, "sklearn.datasets.load_digits", "exceeds the float16 range", "--dtype float32")
    code, _, err = run_cli(_digits("test_cache_teacher_bad_input:huge_teacher", weights, out, "--dtype", "float32",
                                   "--overwrite"), capsys, monkeypatch)
    assert code == 0, err
    assert kdcache.open_cache(out).logits[3:, 0].max() == 1e6


# ---------------------------------------------------------------------------------------------- existing path

def test_taken_out_path_is_refused_before_the_teacher_is_loaded(tmp_path, capsys, monkeypatch, digits_weights):
    out = tmp_path / "c.kdcache"
    assert run_cli(_digits("teachers_for_tests:linear_digits", digits_weights, out), capsys, monkeypatch)[0] == 0
    before = (out / "zarr.json").read_bytes()
    # weights that cannot load would be the first complaint if the path were checked after the teacher is loaded
    (tmp_path / "garbage.pt").write_bytes(b"not a state dict")
    code, _, err = run_cli(_digits("teachers_for_tests:linear_digits", tmp_path / "garbage.pt", out), capsys,
                           monkeypatch)
    assert code == 1 and err.strip() == f"error: {out}: already exists; pass --overwrite to replace it"
    assert (out / "zarr.json").read_bytes() == before and len(kdcache.open_cache(out)) == 1437  # untouched


def test_overwrite_never_replaces_a_folder_that_is_not_a_cache(tmp_path, capsys, monkeypatch, digits_weights):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_cli(_digits("teachers_for_tests:linear_digits", digits_weights, out, "--overwrite"),
                           capsys, monkeypatch)
    assert_bad_input(code, err, out, out, "refusing to overwrite", "not a kdcache cache")
    assert (out / "notes.txt").read_text() == "keep me"


def test_an_interrupted_cache_is_named_and_replaced_only_on_request(tmp_path, capsys, monkeypatch, digits_weights):
    weights = tmp_path / "nan.pt"
    torch.save(getattr(__import__("teachers_for_tests"), "nan_teacher")().state_dict(), weights)
    out = tmp_path / "c.kdcache"
    assert run_cli(_digits("teachers_for_tests:nan_teacher", weights, out), capsys, monkeypatch)[0] == 1
    code, _, err = run_cli(_digits("teachers_for_tests:linear_digits", digits_weights, out), capsys, monkeypatch)
    assert_bad_input(code, err, out, out, "interrupted cache written with other settings", "teacher_sha256",
                     "--overwrite")
    code, _, err = run_cli(_digits("teachers_for_tests:linear_digits", digits_weights, out, "--overwrite"),
                           capsys, monkeypatch)
    assert code == 0, err
    assert len(kdcache.open_cache(out)) == 1437


# ---------------------------------------------------------------------------------------------- full disk

def _fill_disk_when(monkeypatch, predicate):
    """Make the local store raise ENOSPC on the first write for which predicate(key, bytes) holds."""
    original = zarr.storage.LocalStore.set

    async def set_or_fail(self, key, value, *args, **kwargs):
        if predicate(key, value.to_bytes()):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, key, value, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_or_fail)


def test_full_disk_while_creating_a_splits_arrays(tmp_path, capsys, monkeypatch, digits_weights):
    _fill_disk_when(monkeypatch, lambda key, data: key == "train/labels/zarr.json")
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(_digits("teachers_for_tests:linear_digits", digits_weights, out), capsys, monkeypatch)
    assert_bad_input(code, err, out, out, "disk full", "split 'train'")
    monkeypatch.undo()
    # still inspectable: `info` says what is missing instead of failing
    code, stdout, _ = run_cli(["info", out, "--json"], capsys, monkeypatch)
    split = json.loads(stdout)["splits"][0]
    assert code == 0 and split["complete"] is False and "labels" in split["missing_arrays"]
    code, stdout, _ = run_cli(["info", out], capsys, monkeypatch)
    assert code == 0 and "INCOMPLETE" in stdout and "missing: labels" in stdout


def test_full_disk_on_the_final_complete_flag(tmp_path, capsys, monkeypatch, digits_weights):
    _fill_disk_when(monkeypatch, lambda key, data: key == "zarr.json" and b'"completed"' in data)
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(_digits("teachers_for_tests:linear_digits", digits_weights, out), capsys, monkeypatch)
    assert_bad_input(code, err, out, out, "disk full while writing the final attributes")
    monkeypatch.undo()
    assert read_root_attrs(out)["complete"] is False
    # every row made it to disk, but the cache is still not used silently
    assert kdcache.open_cache(out, allow_incomplete=True).split_attrs["complete"] is True


# ---------------------------------------------------------------------------------------------- device

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_on_a_machine_without_it(tmp_path, capsys, monkeypatch, digits_weights):
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(_digits("teachers_for_tests:linear_digits", digits_weights, out, "--device", "cuda"),
                           capsys, monkeypatch)
    assert_bad_input(code, err, out, "device 'cuda' requested but CUDA is not available")
    assert not out.exists()
