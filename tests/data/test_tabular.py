"""Task `tabular`: .npz feature tables (x (N, D), y (N,)) read, fingerprinted, cached and distilled from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdcache.data import DataOptions, load_split, modality_of
from kdcache.errors import KDCacheError
from kdcache.fingerprint import fingerprint_features
from kdcache.models import mlp
from kdcache.models.teachers import save_model_dir
from helpers import _one_error_line, run_cli


def _write(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


@pytest.fixture
def regression_dir(tmp_path):
    """A tiny regression table: y = sum of the features plus a little noise; train 40 rows, validation 16."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "reg"
    for split, n in (("train", 40), ("validation", 16)):
        x = rng.normal(size=(n, 3))
        _write(folder / f"{split}.npz", x=x, y=(x.sum(1) + 0.1 * rng.normal(size=n)).astype(np.float32))
    return folder


@pytest.fixture
def classification_dir(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cls"
    for split, n in (("train", 30), ("validation", 12)):
        x = rng.normal(size=(n, 4)).astype(np.float32)
        _write(folder / f"{split}.npz", x=x, y=(x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1))
    return folder


def test_modality_and_digits_still_load():
    assert modality_of("tabular") == "features" and modality_of("digits") == "features"
    digits = load_split("digits", None, "validation")
    assert len(digits) == 360 and digits.task == "digits"


def test_regression_split_rows_labels_and_batches(regression_dir):
    split = load_split("tabular", regression_dir, "train")
    raw = np.load(regression_dir / "train.npz")
    assert split.task == "tabular" and split.modality == "features" and split.kind == "regression"
    assert split.label_names is None and split.num_labels == 1 and len(split) == 40
    assert split.source == str((regression_dir / "train.npz").resolve())
    assert split.preprocess["file"] == "train.npz" and split.preprocess["shape"] == [40, 3]
    item = split.dataset[5]
    assert item["index"] == 5 and item["fingerprint"] == fingerprint_features(raw["x"][5])
    assert item["label"] == pytest.approx(float(raw["y"][5]))
    batch = split.collate([split.dataset[i] for i in range(4)])
    assert batch.labels.dtype == torch.float32 and batch.index.tolist() == [0, 1, 2, 3]
    prepared = split.prepare(batch, torch.device("cpu"))
    assert prepared.dtype == torch.float32 and prepared.shape == (4, 3)
    np.testing.assert_allclose(prepared.numpy(), raw["x"][:4].astype(np.float32))


def test_classification_labels_and_names(classification_dir, tmp_path):
    split = load_split("tabular", classification_dir, "validation")
    assert split.kind == "classification" and split.collate([split.dataset[0]]).labels.dtype == torch.int64
    largest = int(np.load(classification_dir / "validation.npz")["y"].max())
    assert split.label_names == [str(k) for k in range(largest + 1)]
    named = _write(tmp_path / "named.npz", x=np.zeros((3, 2)), y=np.array([0, 2, -1]),
                   label_names=np.array(["cat", "dog", "bird"]))
    split = load_split("tabular", named, "test")  # a single file serves whichever split is asked for
    assert split.label_names == ["cat", "dog", "bird"] and [split.dataset[i]["label"] for i in range(3)] == [0, 2, -1]


def test_fingerprint_changes_with_one_value_only_in_that_row(tmp_path):
    x = np.random.default_rng(2).normal(size=(10, 5))
    a = load_split("tabular", _write(tmp_path / "a.npz", x=x, y=np.zeros(10)), "train")
    x[7, 3] += 1e-3
    b = load_split("tabular", _write(tmp_path / "b.npz", x=x, y=np.zeros(10)), "train")
    fa = [a.dataset[i]["fingerprint"] for i in range(10)]
    fb = [b.dataset[i]["fingerprint"] for i in range(10)]
    assert [i for i in range(10) if fa[i] != fb[i]] == [7]


def test_limit_and_subset(regression_dir):
    assert len(load_split("tabular", regression_dir, "train", options=DataOptions(limit=7))) == 7
    sub = load_split("tabular", regression_dir, "train", options=DataOptions(subset=5))
    assert [sub.dataset[i]["index"] for i in range(len(sub))] == [0, 10, 20, 29, 39]


@pytest.mark.parametrize("arrays, needle", [
    ({"y": np.zeros(3)}, "no array 'x'"),
    ({"x": np.zeros((3, 2))}, "no array 'y'"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(4)}, "x has 3 rows but y has 4"),
    ({"x": np.array([[0.0, 1.0], [np.nan, 2.0]]), "y": np.zeros(2)}, "x[1, 0]"),
    ({"x": np.array([[0.0], [np.inf]]), "y": np.zeros(2)}, "must be finite"),
    ({"x": np.array([[1e39]]), "y": np.zeros(1)}, "must be finite"),  # overflows float32
    ({"x": np.zeros((2, 1)), "y": np.array([0.0, np.inf])}, "y[1]"),
    ({"x": np.zeros(3), "y": np.zeros(3)}, "expected (N, D)"),
    ({"x": np.zeros((2, 1)), "y": np.array([0, -3])}, "class ids"),
    ({"x": np.array([["a"], ["b"]]), "y": np.zeros(2)}, "dtype"),
    ({"x": np.zeros((2, 1)), "y": np.array([0, 3]), "label_names": np.array(["a", "b"])}, "outside label_names"),
])
def test_bad_arrays_name_the_file(tmp_path, arrays, needle):
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(KDCacheError) as err:
        load_split("tabular", path, "train")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and needle in message, message


def test_missing_files_and_bad_archives(tmp_path, regression_dir):
    with pytest.raises(KDCacheError, match="test.npz: missing"):
        load_split("tabular", regression_dir, "test")
    with pytest.raises(KDCacheError, match="no such file or folder"):
        load_split("tabular", tmp_path / "nowhere", "train")
    with pytest.raises(KDCacheError, match="needs --data"):
        load_split("tabular", None, "train")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(KDCacheError, match="junk.npz: not a readable .npz"):
        load_split("tabular", junk, "train")
    csv = tmp_path / "table.csv"
    csv.write_text("x,y\n")
    with pytest.raises(KDCacheError, match="unsupported file type"):
        load_split("tabular", csv, "train")
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([[1.0]], dtype=object), y=np.zeros(1))
    with pytest.raises(KDCacheError, match="objects.npz"):
        load_split("tabular", objects, "train")


def test_cli_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    bad = _write(tmp_path / "data" / "train.npz", x=np.zeros((4, 2)), y=np.zeros(5))
    (tmp_path / "w.pt").touch()  # the data is read (and refused) before the weights are
    code, _, err = run_cli(["cache-teacher", "--teacher", "mlp", "--weights", tmp_path / "w.pt", "--task", "tabular",
                            "--data", tmp_path / "data", "--out", tmp_path / "c.kdcache", "--device", "cpu",
                            "--no-progress"], capsys, monkeypatch)
    _one_error_line(code, err, str(bad), "x has 4 rows but y has 5")


def _teacher_dir(folder):
    """A small random MLP regressor on 3 features, saved as a kdcache model folder (`--teacher DIR`)."""
    torch.manual_seed(0)
    teacher = mlp(1, in_features=3, hidden=16, depth=1).eval()
    save_model_dir(teacher, folder, architecture="mlp", num_classes=1,
                   kwargs={"in_features": 3, "hidden": 16, "depth": 1})
    return teacher


def test_cache_teacher_then_distill_regression_end_to_end(tmp_path, capsys, monkeypatch, regression_dir):
    teacher = _teacher_dir(tmp_path / "teacher")
    cache = tmp_path / "reg.kdcache"
    code, out, err = run_cli(["cache-teacher", "--teacher", tmp_path / "teacher", "--task", "tabular",
                              "--data", regression_dir, "--split", "train", "--split", "validation", "--dtype",
                              "float32", "--out", cache, "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert "cached train: 40 rows x 1 outputs" in out and "cached validation: 16 rows x 1 outputs" in out
    code, out, _ = run_cli(["info", cache, "--json"], capsys, monkeypatch)
    info = json.loads(out)
    assert info["task"]["name"] == "tabular" and info["task"]["kind"] == "regression"
    with torch.inference_mode():
        x = torch.from_numpy(np.load(regression_dir / "train.npz")["x"].astype(np.float32))
        expected = teacher(x).numpy()
    from kdcache.cache.reader import open_cache

    np.testing.assert_allclose(open_cache(cache, split="train").read("logits"), expected, rtol=1e-6, atol=1e-6)
    for method in (["--method", "vanilla", "--alpha", "0"], ["--method", "continuation", "--psi", "constant:0"]):
        run = tmp_path / f"run-{method[1]}"
        code, _, err = run_cli(["distill", "--cache", cache, "--student", "mlp", "--student-kwargs",
                                '{"in_features": 3, "hidden": 8, "depth": 1}', *method, "--epochs", 2, "--out", run,
                                "--device", "cpu", "--no-progress"], capsys, monkeypatch)
        assert code == 0, err
        summary = json.loads((run / "summary.json").read_text())
        assert summary["task"] == "tabular" and summary["metric_name"] == "pearson" and summary["complete"]
        assert np.isfinite(summary["best_metric"]) and (run / "best" / "kdcache-model.json").is_file()


def test_distill_refuses_changed_data(tmp_path, capsys, monkeypatch, regression_dir):
    _teacher_dir(tmp_path / "teacher")
    cache = tmp_path / "reg.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", tmp_path / "teacher", "--task", "tabular",
                            "--data", regression_dir, "--subset", 10, "--out", cache, "--device", "cpu",
                            "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    arrays = dict(np.load(regression_dir / "train.npz"))
    arrays["x"][13, 1] += 0.5  # row 13 is one of the 10 evenly spaced rows the subset keeps
    np.savez(regression_dir / "train.npz", **arrays)
    code, _, err = run_cli(["distill", "--cache", cache, "--student", "mlp", "--student-kwargs",
                            '{"in_features": 3, "hidden": 8, "depth": 1}', "--epochs", 1, "--val-split", "none",
                            "--out", tmp_path / "run", "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    _one_error_line(code, err, "train.npz", "source index 13", "the data changed")


def test_a_regression_train_names_its_loss_mse(tmp_path, capsys, monkeypatch, regression_dir):
    code, out, err = run_cli(["train", "--model", "mlp", "--model-kwargs", '{"in_features": 3, "hidden": 8, "depth": 1}',
                              "--task", "tabular", "--data", regression_dir, "--epochs", 1, "--out", tmp_path / "run",
                              "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith("mse mlp: best pearson"), out  # not "ce": a regression trains on squared error
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["objective"] == "mse"
