"""cache-teacher on images: a ResNet-8 teacher on real CIFAR-10 JPEGs (read from the zip) and on CIFAR pickles."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import kdcache
from kdcache.data import DataOptions
from kdcache.errors import KDCacheError
from kdcache.fingerprint import fingerprint_pixels
from kdcache.models import resnet8
from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher

CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
CIFAR10_STD = torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]


@pytest.fixture(scope="module")
def resnet_weights(resnet8_weights):
    return resnet8_weights


def _direct(weights, hwc_images: np.ndarray, num_classes=10) -> np.ndarray:
    model = resnet8(num_classes)
    model.load_state_dict(torch.load(weights))
    model.eval()
    x = torch.from_numpy(hwc_images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return model((x - CIFAR10_MEAN) / CIFAR10_STD).numpy()


def _cache(weights, task, data, out, splits, limit=None, **kw):
    cfg = CacheTeacherConfig(teacher="resnet8", weights=str(weights), task=task, data=str(data), out=out,
                             splits=splits, batch_size=16, device="cpu", progress=False,
                             data_options=DataOptions(limit=limit, normalize="cifar10" if task != "cifar100" else None),
                             **kw)
    return cache_teacher(cfg)


def test_resnet_on_real_cifar10_jpeg_zip(tmp_path, resnet_weights, cifar10_zip):
    path = _cache(resnet_weights, "imagefolder", cifar10_zip, tmp_path / "c.kdcache", ("train", "test"), limit=40)
    cache = kdcache.open_cache(path, "test")
    with zipfile.ZipFile(cifar10_zip) as archive:
        names = sorted(n for n in archive.namelist() if "/test/" in f"/{n}" and n.endswith(".jpg"))[:40]
        images = np.stack([np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("RGB")) for n in names])
    direct = _direct(resnet_weights, images)
    np.testing.assert_allclose(cache.logits[:].astype(np.float32), direct, rtol=2**-10, atol=1e-3)
    np.testing.assert_array_equal(cache.fingerprint[:], [fingerprint_pixels(im) for im in images])
    assert cache.attrs["task"]["label_names"][0] == "airplane" and cache.labels[0] == 0
    assert len(kdcache.open_cache(path, "train")) == 40


def _write_cifar10(folder, images_per_batch=6, seed=0, labels=None):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    all_hwc = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        hwc = rng.integers(0, 256, size=(images_per_batch, 32, 32, 3), dtype=np.uint8)
        rows = hwc.transpose(0, 3, 1, 2).reshape(images_per_batch, 3072)
        batch_labels = labels if labels is not None else rng.integers(0, 10, images_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": list(batch_labels), b"batch_label": name.encode()}, f)
        all_hwc.append(hwc)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                            "frog", "horse", "ship", "truck"]]}, f)
    return np.concatenate(all_hwc[:5]), all_hwc[5]


def test_resnet_on_cifar10_pickles(tmp_path, resnet_weights):
    train_hwc, test_hwc = _write_cifar10(tmp_path / "cifar-10-batches-py")
    path = _cache(resnet_weights, "cifar10", tmp_path / "cifar-10-batches-py", tmp_path / "c.kdcache",
                  ("train", "test"))
    train = kdcache.open_cache(path, "train")
    assert len(train) == 30
    np.testing.assert_allclose(train.logits[:].astype(np.float32), _direct(resnet_weights, train_hwc),
                               rtol=2**-10, atol=1e-3)
    np.testing.assert_array_equal(train.fingerprint[:], [fingerprint_pixels(im) for im in train_hwc])
    np.testing.assert_allclose(kdcache.open_cache(path, "test").logits[:].astype(np.float32),
                               _direct(resnet_weights, test_hwc), rtol=2**-10, atol=1e-3)


def test_one_changed_pixel_changes_only_that_fingerprint(tmp_path, resnet_weights):
    _write_cifar10(tmp_path / "a" / "cifar-10-batches-py")
    _write_cifar10(tmp_path / "b" / "cifar-10-batches-py")
    batch_file = tmp_path / "b" / "cifar-10-batches-py" / "data_batch_1"
    batch = pickle.loads(batch_file.read_bytes())
    batch[b"data"][2, 100] ^= 1
    batch_file.write_bytes(pickle.dumps(batch))
    a = kdcache.open_cache(_cache(resnet_weights, "cifar10", tmp_path / "a" / "cifar-10-batches-py",
                                  tmp_path / "a.kdcache", ("train",)))
    b = kdcache.open_cache(_cache(resnet_weights, "cifar10", tmp_path / "b" / "cifar-10-batches-py",
                                  tmp_path / "b.kdcache", ("train",)))
    assert np.flatnonzero(a.fingerprint[:] != b.fingerprint[:]).tolist() == [2]


def test_cifar100_pickles_with_a_100_way_teacher(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        rows = rng.integers(0, 256, size=(5, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"fine_labels": rng.integers(0, 100, 5).tolist(),
                         b"coarse_labels": rng.integers(0, 20, 5).tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}, f)
    torch.manual_seed(0)
    weights = tmp_path / "r100.pt"
    torch.save(resnet8(100).state_dict(), weights)
    cache = kdcache.open_cache(_cache(weights, "cifar100", folder, tmp_path / "c.kdcache", ("train",)))
    assert cache.logits.shape == (5, 100) and cache.attrs["task"]["label_names"][99] == "class99"


def test_label_outside_the_teachers_outputs(tmp_path, resnet_weights):
    _write_cifar10(tmp_path / "cifar-10-batches-py", labels=[0, 1, 12, 3, 4, 5])
    with pytest.raises(KDCacheError, match="cifar-10-batches-py/data_batch_1: labels outside 0..9"):
        _cache(resnet_weights, "cifar10", tmp_path / "cifar-10-batches-py", tmp_path / "c.kdcache", ("train",))
    assert not (tmp_path / "c.kdcache").exists()  # rejected before anything was written
