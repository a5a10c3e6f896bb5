"""Image loaders on real CIFAR-10 JPEGs (read from the zip in place) and on CIFAR python pickles the tests write."""

from __future__ import annotations

import io
import multiprocessing
import re
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdcache.data import images as images_module
from kdcache.data.images import NORMALIZE_PRESETS, load_image_split
from kdcache.errors import KDCacheError
from kdcache.fingerprint import fingerprint_pixels

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _pixels_of(item) -> np.ndarray:
    return item["inputs"].permute(1, 2, 0).numpy()


def _decode_member(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(zf.read(name))).convert("RGB"))


# ------------------------------------------------------------------------------------------ real CIFAR-10 zip

@pytest.mark.parametrize("split", ["train", "test"])
def test_zip_slice_shapes_order_labels(cifar10_zip, split):
    data = load_image_split("imagefolder", cifar10_zip, split, limit=64)
    assert len(data) == 64
    assert data.label_names == CIFAR10_CLASSES
    assert data.source == str(cifar10_zip.resolve())
    assert (data.modality, data.kind, data.preprocess["layout"]) == ("image", "classification", "zip")
    with zipfile.ZipFile(cifar10_zip) as zf:
        expected = sorted(n for n in zf.namelist() if n.startswith(f"{split}/") and n.endswith(".jpg"))[:64]
        assert data.dataset.members == expected
        for i in (0, 17, 63):
            item = data.dataset[i]
            assert item["inputs"].dtype == torch.uint8 and tuple(item["inputs"].shape) == (3, 32, 32)
            assert item["index"] == i
            assert data.label_names[item["label"]] == expected[i].split("/")[1]
            np.testing.assert_array_equal(_pixels_of(item), _decode_member(zf, expected[i]))
            assert item["fingerprint"] == fingerprint_pixels(_decode_member(zf, expected[i]))


def _class_size(zip_path, split: str) -> int:
    """Images per class folder of a split (the zip holds the same number of each class)."""
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.startswith(f"{split}/") and n.endswith(".jpg")]
    assert len(names) % len(CIFAR10_CLASSES) == 0
    return len(names) // len(CIFAR10_CLASSES)


def _full_split_labels_follow_class_folders(zip_path, per_class: int):
    data = load_image_split("imagefolder", zip_path, "test")
    assert len(data) == 10 * per_class
    for k, name in enumerate(CIFAR10_CLASSES):
        i = per_class * k + 7
        assert data.dataset.members[i] == f"test/{name}/0007.jpg"
        assert data.dataset[i]["label"] == k
    assert data.dataset.members == sorted(data.dataset.members)


def test_zip_whole_split_labels_follow_class_folders(cifar10_zip):
    _full_split_labels_follow_class_folders(cifar10_zip, _class_size(cifar10_zip, "test"))


def test_zip_full_split_labels_follow_class_folders(shared_data):
    _full_split_labels_follow_class_folders(shared_data / "cifar10-jpg" / "cifar10-jpg-d7d0561.zip", 1000)


def test_zip_and_extracted_folder_agree(cifar10_zip, tmp_path):
    """Five test images per class, extracted into a folder tree and re-zipped under a top-level folder."""
    picked = [f"test/{c}/{j:04d}.jpg" for c in CIFAR10_CLASSES for j in range(5)]
    root = tmp_path / "tree"
    small_zip = tmp_path / "small.zip"
    with zipfile.ZipFile(cifar10_zip) as zf, zipfile.ZipFile(small_zip, "w") as out:
        for name in picked:
            raw = zf.read(name)
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(raw)
            out.writestr(f"cifar-small/{name}", raw)
    big = load_image_split("imagefolder", cifar10_zip, "test")
    folder = load_image_split("imagefolder", root, "test")
    nested = load_image_split("imagefolder", small_zip, "test")
    assert folder.preprocess["layout"] == "folder" and nested.preprocess["zip_prefix"] == "cifar-small/"
    assert len(folder) == len(nested) == 50
    assert folder.label_names == nested.label_names == CIFAR10_CLASSES
    for i, name in enumerate(picked):
        k = CIFAR10_CLASSES.index(name.split("/")[1])
        ref, a, b = big.dataset[big.dataset.members.index(name)], folder.dataset[i], nested.dataset[i]
        assert a["fingerprint"] == b["fingerprint"] == ref["fingerprint"]
        assert a["label"] == b["label"] == ref["label"] == k
        assert torch.equal(a["inputs"], ref["inputs"]) and torch.equal(b["inputs"], ref["inputs"])


def test_dataloader_workers_over_zip(cifar10_zip):
    data = load_image_split("imagefolder", cifar10_zip, "train", limit=64)
    data.dataset[0]  # open the zip in the parent first: workers must not reuse its handle after fork
    direct = data.collate([data.dataset[i] for i in range(64)])
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=16, num_workers=2, collate_fn=data.collate)
    batches = list(loader)
    assert len(batches) == 4
    assert torch.equal(torch.cat([b.inputs for b in batches]), direct.inputs)
    assert torch.equal(torch.cat([b.index for b in batches]), torch.arange(64))
    np.testing.assert_array_equal(np.concatenate([b.fingerprint for b in batches]), direct.fingerprint)
    # spawn/forkserver workers receive a pickled dataset: it must not carry an open handle
    clone = pickle.loads(pickle.dumps(data.dataset))
    assert not any(isinstance(v, zipfile.ZipFile) for v in vars(clone).values())
    assert clone[5]["fingerprint"] == direct.fingerprint[5]


def _zip_fd(key) -> int:
    return images_module._open_zip(key).fp.fileno()


def test_forked_process_opens_its_own_zip_handle(cifar10_zip):
    """A child must not read through the parent's handle: the shared file offset corrupts concurrent reads."""
    data = load_image_split("imagefolder", cifar10_zip, "test", limit=4)
    parent_fd = _zip_fd(data.dataset.zip_key)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child_fd = pool.apply(_zip_fd, (data.dataset.zip_key,))
    assert child_fd != parent_fd
    assert _zip_fd(data.dataset.zip_key) == parent_fd  # one handle per process, reused


def test_collate_and_prepare(cifar10_zip):
    data = load_image_split("imagefolder", cifar10_zip, "test", limit=8, normalize="cifar10")
    batch = data.collate([data.dataset[i] for i in range(8)])
    assert batch.inputs.dtype == torch.uint8 and tuple(batch.inputs.shape) == (8, 3, 32, 32)
    assert batch.labels.dtype == torch.int64 and batch.index.dtype == torch.int64
    assert batch.fingerprint.dtype == np.uint64 and batch.fingerprint.shape == (8,)
    x = data.prepare(batch, torch.device("cpu"))
    assert x.dtype == torch.float32 and x.shape == batch.inputs.shape
    mean, std = NORMALIZE_PRESETS["cifar10"]
    for c in range(3):
        v = batch.inputs[3, c, 10, 20].item()
        assert x[3, c, 10, 20].item() == pytest.approx((v / 255 - mean[c]) / std[c], abs=1e-5)
    assert data.preprocess["mean"] == list(mean) and data.preprocess["normalize"] == "cifar10"
    raw = load_image_split("imagefolder", cifar10_zip, "test", limit=8, normalize="none")
    assert raw.preprocess["mean"] is None
    torch.testing.assert_close(raw.prepare(batch, torch.device("cpu")), batch.inputs.float() / 255)
    default = load_image_split("imagefolder", cifar10_zip, "test", limit=8)
    assert default.preprocess["normalize"] == "imagenet"


# ------------------------------------------------------------------------------------------ CIFAR pickles

def _write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _make_cifar10(root: Path, rows: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(rows, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=rows).tolist()
        _write_pickle(folder / name, {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                      b"filenames": [b"x.png"] * rows})
        batches[name] = (data, labels)
    _write_pickle(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                                            b"num_cases_per_batch": rows, b"num_vis": 3072})
    return batches


def _make_cifar100(root: Path, rows: int = 4) -> dict:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name in ("train", "test"):
        data = rng.integers(0, 256, size=(rows, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=rows).tolist()
        _write_pickle(folder / name, {b"filenames": [b"x.png"] * rows, b"fine_labels": fine,
                                      b"coarse_labels": [f // 5 for f in fine], b"data": data})
        out[name] = (data, fine)
    _write_pickle(folder / "meta", {b"fine_label_names": [f"class{i:02d}".encode() for i in range(100)],
                                    b"coarse_label_names": [f"super{i:02d}".encode() for i in range(20)]})
    return out


def test_cifar10_pickles(tmp_path):
    batches = _make_cifar10(tmp_path)
    train = load_image_split("cifar10", tmp_path, "train")  # the parent of cifar-10-batches-py
    assert len(train) == 15 and train.label_names == CIFAR10_CLASSES
    assert train.source == str((tmp_path / "cifar-10-batches-py").resolve())
    assert train.preprocess["layout"] == "pickle" and train.preprocess["normalize"] == "cifar10"
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    for i in range(15):
        item = train.dataset[i]
        hwc = _pixels_of(item)
        assert hwc.shape == (32, 32, 3) and item["label"] == labels[i] and item["index"] == i
        y, x = 5, 27  # R, G, B planes of 1024 values each, row-major within a plane
        assert list(hwc[y, x]) == [data[i, y * 32 + x], data[i, 1024 + y * 32 + x], data[i, 2048 + y * 32 + x]]
        np.testing.assert_array_equal(hwc, data[i].reshape(3, 32, 32).transpose(1, 2, 0))
        assert item["fingerprint"] == fingerprint_pixels(hwc)
    test = load_image_split("cifar10", tmp_path / "cifar-10-batches-py", "test", limit=2)
    assert len(test) == 2 and [test.dataset[i]["label"] for i in range(2)] == batches["test_batch"][1][:2]
    assert load_image_split("cifar10", tmp_path, "train", limit=4).dataset[3]["fingerprint"] == \
        train.dataset[3]["fingerprint"]


def test_cifar100_pickles_and_validation_alias(tmp_path):
    out = _make_cifar100(tmp_path)
    val = load_image_split("cifar100", tmp_path, "validation")
    test = load_image_split("cifar100", tmp_path, "test")
    assert val.preprocess["split_alias"] == "validation -> test" and val.preprocess["split_used"] == "test"
    assert test.preprocess["split_alias"] is None
    assert len(val.label_names) == 100 and val.label_names[7] == "class07"
    assert val.preprocess["normalize"] == "cifar100"
    data, fine = out["test"]
    for i in range(4):
        assert val.dataset[i]["label"] == fine[i] == test.dataset[i]["label"]
        assert val.dataset[i]["fingerprint"] == test.dataset[i]["fingerprint"]
        np.testing.assert_array_equal(_pixels_of(val.dataset[i]), data[i].reshape(3, 32, 32).transpose(1, 2, 0))
    assert load_image_split("cifar10", _make_cifar10_dir(tmp_path), "validation").preprocess["split_used"] == "test"


def _make_cifar10_dir(tmp_path: Path) -> Path:
    root = tmp_path / "c10"
    _make_cifar10(root)
    return root


def test_one_pixel_changes_the_fingerprint(tmp_path):
    batches = _make_cifar10(tmp_path / "a")
    before = load_image_split("cifar10", tmp_path / "a", "test")
    data, labels = batches["test_batch"]
    data = data.copy()
    data[1, 1024 + 40] ^= 1  # one green value of row 1
    _write_pickle(tmp_path / "a" / "cifar-10-batches-py" / "test_batch", {b"labels": labels, b"data": data})
    after = load_image_split("cifar10", tmp_path / "a", "test")
    assert after.dataset[0]["fingerprint"] == before.dataset[0]["fingerprint"]
    assert after.dataset[1]["fingerprint"] != before.dataset[1]["fingerprint"]


# ------------------------------------------------------------------------------------------ sizes and resizing

def _png(path: Path, w: int, h: int, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def test_mixed_sizes_need_image_size(tmp_path):
    first = _png(tmp_path / "train" / "a" / "0.png", 32, 32, 0)
    _png(tmp_path / "train" / "b" / "1.PNG", 40, 30, 1)
    data = load_image_split("imagefolder", tmp_path, "train")
    np.testing.assert_array_equal(_pixels_of(data.dataset[0]), first)  # PNG is lossless
    with pytest.raises(KDCacheError, match=r"b/1\.PNG.*40x30.*32x32"):
        data.dataset[1]
    resized = load_image_split("imagefolder", tmp_path, "train", image_size=24)
    assert resized.preprocess["image_size"] == 24 and resized.preprocess["input_size"] == [24, 24]
    for i in range(2):
        item = resized.dataset[i]
        assert tuple(item["inputs"].shape) == (3, 24, 24)
        assert item["fingerprint"] == fingerprint_pixels(_pixels_of(item))  # fingerprint is after the resize
    assert resized.dataset[1]["fingerprint"] == resized.dataset[1]["fingerprint"]  # deterministic
    assert resized.dataset[0]["fingerprint"] != data.dataset[0]["fingerprint"]


def test_class_ids_come_from_train_and_validation_resolves(tmp_path):
    for cls in ("ant", "bee", "cat"):
        _png(tmp_path / "train" / cls / "0.png", 8, 8, 0)
    _png(tmp_path / "val" / "cat" / "z.png", 8, 8, 1)
    _png(tmp_path / "val" / "bee" / "a.png", 8, 8, 2)
    val = load_image_split("imagefolder", tmp_path, "validation")
    assert val.label_names == ["ant", "bee", "cat"]
    assert [val.dataset[i]["label"] for i in range(2)] == [1, 2]
    assert val.preprocess["split_folder"] == "val" and val.preprocess["split_alias"] == "validation -> val"


# ------------------------------------------------------------------------------------------ errors

def test_error_unknown_task_and_preset(tmp_path):
    with pytest.raises(KDCacheError, match="unknown image task 'stl10'"):
        load_image_split("stl10", tmp_path, "train")
    _make_cifar10(tmp_path)
    with pytest.raises(KDCacheError, match="unknown normalisation preset 'bogus'"):
        load_image_split("cifar10", tmp_path, "train", normalize="bogus")


def test_error_missing_folder_and_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(KDCacheError, match=f"{re.escape(str(missing))}.*cifar-10-batches-py"):
        load_image_split("cifar10", missing, "train")
    with pytest.raises(KDCacheError, match=f"{re.escape(str(missing))}: no such file or folder"):
        load_image_split("imagefolder", missing, "train")
    with pytest.raises(KDCacheError, match="cifar-100-python"):
        load_image_split("cifar100", tmp_path, "train")  # exists, but holds no CIFAR-100 folder
    _make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(KDCacheError, match=r"data_batch_3: missing"):
        load_image_split("cifar10", tmp_path, "train")
    assert len(load_image_split("cifar10", tmp_path, "test")) == 3  # the test split does not need it


def test_error_unknown_split(tmp_path, cifar10_zip):
    _make_cifar10(tmp_path)
    with pytest.raises(KDCacheError, match=r"cifar-10-batches-py: unknown cifar10 split 'extra' \(splits: train, test"):
        load_image_split("cifar10", tmp_path, "extra")
    with pytest.raises(KDCacheError, match=rf"{re.escape(str(cifar10_zip))}: no split folder 'holdout'.*found: test, train"):
        load_image_split("imagefolder", cifar10_zip, "holdout")
    tree = tmp_path / "tree"
    _png(tree / "train" / "a" / "0.png", 8, 8, 0)
    with pytest.raises(KDCacheError, match=rf"{re.escape(str(tree))}: no split folder 'validation'.*found: train"):
        load_image_split("imagefolder", tree, "validation")


def test_error_empty_split(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(KDCacheError, match=rf"{re.escape(str(tmp_path / 'train'))}: no images"):
        load_image_split("imagefolder", tmp_path, "train")


def test_error_corrupt_image_named_when_read(tmp_path):
    _png(tmp_path / "train" / "a" / "0.png", 8, 8, 0)
    (tmp_path / "train" / "a" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    data = load_image_split("imagefolder", tmp_path, "train")  # nothing decoded yet
    data.dataset[0]
    with pytest.raises(KDCacheError, match=r"a/1\.jpg: cannot decode image"):
        data.dataset[1]
    bad_zip = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad_zip, "w") as zf:
        zf.writestr("train/a/0.jpg", b"garbage")
    with pytest.raises(KDCacheError, match=r"train/a/0\.jpg in .*bad\.zip: cannot decode image"):
        load_image_split("imagefolder", bad_zip, "train").dataset[0]
    not_zip = tmp_path / "fake.zip"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(KDCacheError, match=r"fake\.zip: not a readable zip file"):
        load_image_split("imagefolder", not_zip, "train")


def test_error_pickle_wrong_shape(tmp_path):
    _make_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    _write_pickle(bad, {b"labels": [0, 1], b"data": np.zeros((2, 1024), dtype=np.uint8)})
    with pytest.raises(KDCacheError, match=rf"{re.escape(str(bad))}: b'data' is uint8 \(2, 1024\)"):
        load_image_split("cifar10", tmp_path, "test")
    bad.write_bytes(b"\x80\x02 truncated")
    with pytest.raises(KDCacheError, match=rf"{re.escape(str(bad))}: not a readable CIFAR python pickle"):
        load_image_split("cifar10", tmp_path, "test")


def test_errors_are_one_line(tmp_path):
    _make_cifar10(tmp_path)
    for call in (lambda: load_image_split("cifar10", tmp_path, "nope"),
                 lambda: load_image_split("imagefolder", tmp_path / "x", "train"),
                 lambda: load_image_split("cifar10", tmp_path, "train", limit=0)):
        with pytest.raises(KDCacheError) as info:
            call()
        assert "\n" not in str(info.value)


def _binstring_pickle(obj) -> bytes:
    """A pickle whose pixel bytes are one BINSTRING, as in the CIFAR batches Python 2 wrote: protocol 3's BINBYTES
    has the same layout (opcode, 4-byte length, the bytes), so only its opcode changes."""
    import io
    import pickletools

    raw = bytearray(pickle.dumps(obj, protocol=3))
    for op, arg, pos in pickletools.genops(io.BytesIO(bytes(raw))):
        if op.name == "BINBYTES" and len(arg) > 1000:
            raw[pos:pos + 1] = b"T"
    return bytes(raw)


@pytest.mark.parametrize("form", ["python2 BINSTRING", "protocol 4", "protocol 2 from Python 3"])
def test_cifar_pixels_are_read_from_the_file_in_place_not_held(tmp_path, form):
    """Batches whose pixels are raw bytes in the file are memory-mapped there (a 50k-row split costs no memory
    until rows are read); Python 3's protocol 2, which writes bytes as text, is read into memory. Same rows."""
    batches = _make_cifar10(tmp_path, rows=40)
    folder = tmp_path / "cifar-10-batches-py"
    for name, (data, labels) in batches.items():
        obj = {b"labels": labels, b"data": data}
        if form == "python2 BINSTRING":
            (folder / name).write_bytes(_binstring_pickle(obj))
        elif form == "protocol 4":
            (folder / name).write_bytes(pickle.dumps(obj, protocol=4))
    train = load_image_split("cifar10", tmp_path, "train")
    blocks = train.dataset.blocks
    assert len(blocks) == 5
    assert all(isinstance(b, np.memmap) for b in blocks) == (form != "protocol 2 from Python 3")
    for row in (0, 39, 40, 199):
        data, labels = batches[f"data_batch_{row // 40 + 1}"]
        item = train.dataset[row]
        assert np.array_equal(item["inputs"].numpy(), data[row % 40].reshape(3, 32, 32))
        assert item["label"] == labels[row % 40]
    assert len(load_image_split("cifar10", tmp_path, "train", limit=50)) == 50
