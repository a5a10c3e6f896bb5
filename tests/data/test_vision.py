"""torchvision's datasets as distributed: MNIST and Fashion-MNIST idx files (.gz or not, side by side or under
torchvision's root), SVHN .mat files, ImageNet's extracted folder layout; each reading held equal to torchvision's
own dataset class on a layout that class reads, and each damaged or missing file named in one line."""

from __future__ import annotations

import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch

from helpers import _one_error_line, run_cli
from kdcache.data import DataOptions, load_split
from kdcache.data.vision import read_idx
from kdcache.errors import KDCacheError


def _idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.astype(np.uint8).tobytes()


def _write_idx_set(folder, rng, sizes=(("train", 30), ("t10k", 12)), gz=True, classes=10):
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for prefix, n in sizes:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % classes
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            path = folder / f"{prefix}-{kind}{'.gz' if gz else ''}"
            raw = _idx_bytes(array)
            path.write_bytes(gzip.compress(raw) if gz else raw)
        written[prefix] = (images, labels)
    return written


def _rows(split):
    items = [split.dataset[i] for i in range(len(split))]
    return np.stack([it["inputs"].numpy() for it in items]), np.array([it["label"] for it in items])


@pytest.mark.parametrize("task, tv_class, tv_folder", [("mnist", "MNIST", "MNIST"),
                                                       ("fashion-mnist", "FashionMNIST", "FashionMNIST")])
def test_idx_gz_side_by_side_reads_as_torchvision_reads_its_root(tmp_path, task, tv_class, tv_folder):
    import torchvision.datasets as tvd

    rng = np.random.default_rng(0)
    side = _write_idx_set(tmp_path / "gz", rng, gz=True)
    _write_idx_set(tmp_path / "root" / tv_folder / "raw", np.random.default_rng(0), gz=False)
    for split, prefix, train in (("train", "train", True), ("validation", "t10k", False)):
        ours = load_split(task, tmp_path / "gz", split)
        from_root = load_split(task, tmp_path / "root", split)
        reference = getattr(tvd, tv_class)(str(tmp_path / "root"), train=train, download=False)
        pixels, labels = _rows(ours)
        assert pixels.shape == (len(reference), 1, 28, 28)
        assert np.array_equal(pixels[:, 0], reference.data.numpy())
        assert np.array_equal(labels, reference.targets.numpy())
        assert np.array_equal(pixels[:, 0], side[prefix][0])
        assert ours.label_names == list(reference.classes)
        assert [it["fingerprint"] for it in (ours.dataset[0], ours.dataset[5])] == \
            [from_root.dataset[i]["fingerprint"] for i in (0, 5)]
        assert ours.preprocess["split_used"] == ("train" if train else "test")
        assert ours.preprocess["normalize"] == task and ours.preprocess["pixels"].startswith("grayscale")


def test_idx_limit_reads_only_the_first_rows_and_damage_is_named(tmp_path):
    _write_idx_set(tmp_path, np.random.default_rng(1), gz=True)
    assert len(load_split("mnist", tmp_path, "train", options=DataOptions(limit=7))) == 7
    # Truncate the image file after its header: a limit inside what is left still reads, the whole split does not.
    images = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[:16 + 28 * 28 * 5]))
    assert len(read_idx(images, limit=5)) == 5
    with pytest.raises(KDCacheError, match=r"train-images-idx3-ubyte.gz: truncated: its header promises 30 items"):
        load_split("mnist", tmp_path, "train")
    images.write_bytes(b"not gzip at all")
    with pytest.raises(KDCacheError, match=r"train-images-idx3-ubyte.gz: cannot read \(BadGzipFile"):
        load_split("mnist", tmp_path, "train")
    (tmp_path / "plain-images").write_bytes(b"\x08\x03\x00\x00")
    with pytest.raises(KDCacheError, match="not an idx file"):
        read_idx(tmp_path / "plain-images")


def test_idx_missing_file_and_wrong_normalisation_are_one_line(tmp_path, capsys, monkeypatch):
    _write_idx_set(tmp_path, np.random.default_rng(2), gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(KDCacheError, match=r"t10k-labels-idx1-ubyte\(.gz\): missing; fashion-mnist expects"):
        load_split("fashion-mnist", tmp_path, "test")
    with pytest.raises(KDCacheError, match=r"normalisation 'cifar10' has 3 channel\(s\) but mnist's images have 1"):
        load_split("mnist", tmp_path, "train", options=DataOptions(normalize="cifar10"))
    code, _, err = run_cli(["train", "--model", "mlp", "--task", "mnist", "--data", tmp_path, "--epochs", "1",
                            "--out", tmp_path / "run", "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    _one_error_line(code, err, "t10k-labels-idx1-ubyte(.gz): missing")
    assert not (tmp_path / "run" / "best").exists()


def test_svhn_mat_reads_as_torchvision_reads_it(tmp_path, monkeypatch):
    import scipy.io
    import torchvision.datasets as tvd

    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (32, 32, 3, 9), dtype=np.uint8)
    y = np.array([[10], [1], [2], [3], [4], [5], [6], [7], [10]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    monkeypatch.setattr(tvd.SVHN, "_check_integrity", lambda self: True)  # our file is not the published one
    reference = tvd.SVHN(str(tmp_path), split="train")
    ours = load_split("svhn", tmp_path, "train")
    pixels, labels = _rows(ours)
    assert np.array_equal(pixels, reference.data) and np.array_equal(labels, reference.labels)
    assert labels[0] == 0 and ours.label_names == [str(d) for d in range(10)]
    assert len(load_split("svhn", tmp_path, "train", options=DataOptions(limit=4))) == 4
    with pytest.raises(KDCacheError, match=r"test_32x32.mat: missing; svhn expects"):
        load_split("svhn", tmp_path, "validation")
    (tmp_path / "extra_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(KDCacheError, match=r"extra_32x32.mat: not a readable MATLAB file"):
        load_split("svhn", tmp_path, "extra")


def _write_imagenet(root, wnids=("n01440764", "n01443537", "n01484850"), per_class=3, sizes=((40, 30), (33, 50))):
    from PIL import Image

    rng = np.random.default_rng(4)
    for split in ("train", "val"):
        for w in wnids:
            (root / split / w).mkdir(parents=True)
            for k in range(per_class):
                width, height = sizes[k % len(sizes)]
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / w / f"{w}_{k}.JPEG", quality=95)
    torch.save(({w: (f"class {w}", "other name") for w in wnids}, list(wnids)), root / "meta.bin")


def test_imagenet_folder_layout_matches_torchvision(tmp_path):
    import torchvision.datasets as tvd

    _write_imagenet(tmp_path)
    for split in ("train", "validation"):
        ours = load_split("imagenet", tmp_path, split)
        reference = tvd.ImageNet(str(tmp_path), split="val" if split == "validation" else "train")
        assert ours.label_names == reference.wnids
        assert [ours.dataset[i]["label"] for i in range(len(ours))] == reference.targets
        assert [os.path.realpath(ours.dataset.where(i)) for i in range(len(ours))] == \
            [os.path.realpath(path) for path, _ in reference.samples]  # row i is torchvision's sample i
        first = ours.dataset[0]["inputs"]
        assert tuple(first.shape) == (3, 224, 224)  # mixed sizes: shorter side to 224, centred crop
        assert ours.preprocess["class_descriptions"]["n01440764"] == "class n01440764"
        assert ours.preprocess["normalize"] == "imagenet" and ours.preprocess["image_size"] == 224
    assert tuple(load_split("imagenet", tmp_path, "train", options=DataOptions(image_size=32)).dataset[0]["inputs"].shape) \
        == (3, 32, 32)


def test_imagenet_unextracted_archive_or_missing_split_is_one_line(tmp_path):
    _write_imagenet(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "val")
    with pytest.raises(KDCacheError, match=r"val: missing; expected torchvision's extracted layout"):
        load_split("imagenet", tmp_path, "validation")
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"")
    with pytest.raises(KDCacheError, match=r"ILSVRC2012_img_val.tar is here but not extracted: run "
                                           r"torchvision.datasets.ImageNet"):
        load_split("imagenet", tmp_path, "validation")
    (tmp_path / "meta.bin").write_bytes(b"damaged")
    with pytest.raises(KDCacheError, match=r"meta.bin: unreadable"):
        load_split("imagenet", tmp_path, "train")


def test_mlp_and_resnet_take_their_shape_from_the_data(tmp_path, capsys, monkeypatch):
    """`--model mlp` on 28x28 grayscale reads 784 inputs and `resnet8` one channel, with no flag; both train and
    save folders that load back with the width they were built with."""
    from kdcache.models import load_teacher

    _write_idx_set(tmp_path / "fm", np.random.default_rng(5), gz=True)
    for model in ("mlp", "resnet8"):
        code, out, err = run_cli(["train", "--model", model, "--task", "fashion-mnist", "--data", tmp_path / "fm",
                                  "--epochs", "1", "--batch-size", "8", "--out", tmp_path / model, "--device", "cpu",
                                  "--no-progress"], capsys, monkeypatch)
        assert code == 0, err
        saved = json.loads((tmp_path / model / "best" / "kdcache-model.json").read_text())
        expected = {"in_features": 784} if model == "mlp" else {"in_channels": 1}
        assert {k: saved["kwargs"][k] for k in expected} == expected
        teacher = load_teacher(str(tmp_path / model / "best"))
        assert teacher.model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    code, _, err = run_cli(["train", "--model", "mlp", "--model-kwargs", '{"in_features": 64}', "--task",
                            "fashion-mnist", "--data", tmp_path / "fm", "--epochs", "1", "--out", tmp_path / "bad",
                            "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    _one_error_line(code, err, "in_features=64 was given, but this task's rows (1x28x28) need in_features=784")


def test_a_student_that_cannot_read_the_data_is_one_line(tmp_path, capsys, monkeypatch, bert_student_config):
    _write_idx_set(tmp_path / "m", np.random.default_rng(6), gz=False)
    code, _, err = run_cli(["train", "--model", bert_student_config, "--task", "mnist", "--data", tmp_path / "m",
                            "--epochs", "1", "--out", tmp_path / "r1", "--device", "cpu", "--no-progress"],
                           capsys, monkeypatch)
    _one_error_line(code, err, "is a Hugging Face text model, but this task's rows are images")
    code, _, err = run_cli(["train", "--model", "resnet8", "--task", "digits", "--epochs", "1", "--out",
                            tmp_path / "r2", "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    _one_error_line(code, err, "resnet8' is a convolutional network for images, but this task's rows are vectors of 64")
