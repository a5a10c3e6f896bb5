"""Trust, round two: what a hostile or careless user can do to kdcache, and what kdcache does about it.

Each test reproduces one defect of the red-team report (issue 10) and asserts the behaviour that replaces it:
no code runs from a run folder, a model folder or a data file; a user's folder is never deleted; every chunk
is bound to its place; labels are checked like inputs; the writer's lock cannot be tricked by a symbolic link;
decompression is bounded; every failure is one line; Ctrl-C says what happened.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import kdcache
from kdcache.errors import Interrupted, KDCacheError
from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
from kdcache.recipes.distill import DistillConfig, distill
from kdcache.models.teachers import save_model_dir
from kdcache.recipes.verify import verify_cache
from kdcache.cache.store import LocalLock as WriteLock
from helpers import _one_error_line, interrupt_autocast_at, run_cli, said, tabular_cache

STUDENT_KW = {"in_features": 64, "hidden": 16, "depth": 1}


class _OpensAFile:
    """Unpickling this calls open(marker, "w"): proof that a pickle ran code if the marker appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    from kdcache.recipes.demo import train_digits_teacher

    folder = tmp_path_factory.mktemp("teacher") / "teacher"
    train_digits_teacher(folder, epochs=2)
    return folder


@pytest.fixture(scope="module")
def chunked_cache(tmp_path_factory, teacher_dir) -> Path:
    """The digits teacher cached in chunks of 256 rows: 6 chunks per array of the train split."""
    out = tmp_path_factory.mktemp("chunked") / "c.kdcache"
    return cache_teacher(CacheTeacherConfig(teacher=str(teacher_dir), task="digits", out=out, chunk_rows=256,
                                            splits=("train", "validation"), device="cpu", progress=False))


def _copy(cache: Path, tmp_path: Path, name: str = "copy.kdcache") -> Path:
    shutil.copytree(cache, tmp_path / name)
    return tmp_path / name


def _chunk_path(cache: Path, split: str, array: str, chunk: int) -> Path:
    from kdcache.cache.reader import TeacherCache

    return TeacherCache(cache, split, check_chunks=False).chunk_file(array, chunk)


def _distill_args(cache, out, *extra):
    return ["distill", "--cache", cache, "--student", "mlp", "--student-kwargs", json.dumps(STUDENT_KW),
            "--epochs", "2", "--out", out, "--device", "cpu", "--no-progress", *extra]


# --- 1. no code from a run folder ---------------------------------------------------------------------------

def test_resume_never_unpickles_code_from_last_pt(tmp_path, capsys, monkeypatch, chunked_cache):
    run = tmp_path / "run"
    assert run_cli(_distill_args(chunked_cache, run, "--stop-after-epoch", "1"), capsys, monkeypatch)[0] == 0
    marker = tmp_path / "pwned"
    state = torch.load(run / "last.pt", weights_only=True)
    state["totals"] = _OpensAFile(marker)  # a crafted last.pt: the identity is right, one value is code
    torch.save(state, run / "last.pt")
    code, _, err = run_cli(_distill_args(chunked_cache, run, "--resume"), capsys, monkeypatch)
    _one_error_line(code, err, str(run / "last.pt"), "refusing to load it", "other than tensors")
    assert not marker.exists(), "unpickling last.pt ran code"


def test_last_pt_holds_only_tensors_and_plain_values(tmp_path, chunked_cache):
    """What distill writes loads with the weights-only unpickler (so the refusal above costs users nothing)."""
    run = tmp_path / "run"
    distill(DistillConfig(student="mlp", student_kwargs=STUDENT_KW, cache=chunked_cache, method="annealing",
                          out=run, epochs=3, device="cpu", progress=False))
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 3 and state["method"]["stage1_best"]["model"]


# --- 2. no code from a model folder --------------------------------------------------------------------------

def _hostile_model_dir(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "kdcache-model.json").write_text(json.dumps({
        "architecture": "subprocess:getoutput", "num_classes": 10, "kwargs": {"cmd": f"touch {marker}"},
        "weights": "model.pt"}))
    return folder


def test_a_model_folder_naming_python_code_runs_nothing_without_trust(tmp_path, capsys, monkeypatch, chunked_cache):
    marker = tmp_path / "pwned"
    hostile = _hostile_model_dir(tmp_path / "hostile", marker)
    commands = {
        "cache-teacher": ["cache-teacher", "--teacher", hostile, "--task", "digits", "--out", tmp_path / "c.kdcache",
                          "--no-progress"],
        "distill": ["distill", "--cache", chunked_cache, "--student", hostile, "--out", tmp_path / "run",
                    "--device", "cpu", "--no-progress"],
        "verify": ["verify", chunked_cache, "--teacher", hostile, "--device", "cpu"],
    }
    for name, args in commands.items():
        code, _, err = run_cli(args, capsys, monkeypatch)
        _one_error_line(code, err, str(hostile / "kdcache-model.json"), "'subprocess:getoutput' is Python code",
                        "--trust-model-code")
        assert not marker.exists(), f"{name} ran the folder's code"


def test_trusted_model_code_in_a_folder_still_loads(tmp_path, capsys, monkeypatch, digits_weights):
    from teachers_for_tests import linear_digits

    model = linear_digits()
    model.load_state_dict(torch.load(digits_weights, weights_only=True))
    folder = save_model_dir(model, tmp_path / "mine", architecture="teachers_for_tests:linear_digits",
                            num_classes=10)
    args = ["cache-teacher", "--teacher", folder, "--task", "digits", "--out", tmp_path / "c.kdcache",
            "--no-progress"]
    _one_error_line(*run_cli(args, capsys, monkeypatch)[::2], "--trust-model-code")
    code, _, err = run_cli([*args, "--trust-model-code"], capsys, monkeypatch)
    assert code == 0, err


# --- 3. no code from a data file -----------------------------------------------------------------------------

def _cifar_folder(root: Path, batch: object) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                  "truck")]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def test_a_crafted_cifar_pickle_is_refused_before_it_runs(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    _cifar_folder(tmp_path / "evil", {b"data": _OpensAFile(marker), b"labels": [0]})
    torch.save(kdcache.models.resnet8(10).state_dict(), tmp_path / "w.pt")
    code, _, err = run_cli(["cache-teacher", "--teacher", "resnet8", "--weights", tmp_path / "w.pt", "--task",
                            "cifar10", "--data", tmp_path / "evil", "--out", tmp_path / "c.kdcache", "--no-progress"],
                           capsys, monkeypatch)
    _one_error_line(code, err, "data_batch_1", "refused", "names io.open", "which a CIFAR batch never holds")
    assert not marker.exists(), "the CIFAR pickle ran code"


def test_real_cifar_batches_still_load(tmp_path):
    """Batches as the CIFAR authors pickled them (numpy arrays, lists, bytes keys; protocol 2) load as before."""
    from kdcache.data import load_split

    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [3, 1, 4, 1],
             b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"], b"batch_label": b"training batch 1 of 5"}
    _cifar_folder(tmp_path / "ok", batch)
    split = load_split("cifar10", tmp_path / "ok", "test")
    assert len(split) == 4 and split.dataset[2]["label"] == 4


# --- 4. nothing of the user's deleted --------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["a partial-named file", "empty folders"])
def test_cache_teacher_never_deletes_a_folder_it_did_not_start(tmp_path, capsys, monkeypatch, teacher_dir, content):
    out = tmp_path / "mine"
    if content == "a partial-named file":
        (out / "thesis").mkdir(parents=True)
        (out / "thesis" / "draft.partial").write_text("three years of work")
    else:
        (out / "experiments" / "next").mkdir(parents=True)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    args = ["cache-teacher", "--teacher", teacher_dir, "--task", "digits", "--out", out, "--no-progress"]
    _one_error_line(*run_cli(args, capsys, monkeypatch)[::2], str(out), "is not a kdcache cache")
    _one_error_line(*run_cli([*args, "--overwrite"], capsys, monkeypatch)[::2], str(out), "not a kdcache cache")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_an_empty_folder_is_written_into_and_a_start_kdcache_left_is_cleaned(tmp_path, capsys, monkeypatch,
                                                                            teacher_dir):
    args = ["cache-teacher", "--teacher", teacher_dir, "--task", "digits", "--no-progress", "--out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli([*args, empty], capsys, monkeypatch)[0] == 0
    assert kdcache.open_cache(empty).attrs["complete"] is True
    started = tmp_path / "started"  # what a writer killed before its first file was in place leaves
    started.mkdir()
    (started / ".kdcache-writer").write_text("{}")
    (started / "zarr.json.partial").write_text("{")
    code, _, err = run_cli([*args, started], capsys, monkeypatch)
    assert code == 0, err
    assert not (started / ".kdcache-writer").exists() and not (started / "zarr.json.partial").exists()


# --- 5. chunks bound to their place ----------------------------------------------------------------------------

ARRAYS = ("logits", "labels", "index", "fingerprint")


@pytest.mark.parametrize("array", ARRAYS)
def test_two_swapped_chunks_are_found_and_named_by_every_reader(tmp_path, capsys, monkeypatch, chunked_cache, array):
    copy = _copy(chunked_cache, tmp_path)
    first, second = _chunk_path(copy, "train", array, 1), _chunk_path(copy, "train", array, 3)
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    needle = f"array {array!r}, chunk 1 (rows 256:512): the chunk does not belong at this place"
    with pytest.raises(KDCacheError, match=__import__("re").escape(needle)):
        kdcache.open_cache(copy).read(array)
    code, out, _ = run_cli(["verify", copy], capsys, monkeypatch)
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert code == 1 and any("train/checksums" in line and needle in line for line in failed), out
    if array != "index":  # distill reads logits, labels and fingerprints; index only to name a bad row
        _one_error_line(*run_cli(_distill_args(copy, tmp_path / "run"), capsys, monkeypatch)[::2], needle,
                        str(first))


def test_a_duplicated_chunk_and_a_chunk_from_another_cache_are_found(tmp_path, teacher_dir, chunked_cache):
    copy = _copy(chunked_cache, tmp_path)
    shutil.copyfile(_chunk_path(copy, "train", "labels", 0), _chunk_path(copy, "train", "labels", 2))
    report = verify_cache(copy)
    assert not report.ok and "array 'labels', chunk 2 (rows 512:768): the chunk does not belong" in str(report.lines())
    # another teacher's cache of the same data: same shapes, same codec, valid checksums, other logits
    other_teacher = tmp_path / "other"
    from kdcache.recipes.demo import train_digits_teacher

    train_digits_teacher(other_teacher, epochs=1, seed=1)
    other = cache_teacher(CacheTeacherConfig(teacher=str(other_teacher), task="digits", out=tmp_path / "o.kdcache",
                                             chunk_rows=256, splits=("train",), device="cpu", progress=False))
    copy2 = _copy(chunked_cache, tmp_path, "copy2.kdcache")
    shutil.copyfile(_chunk_path(other, "train", "logits", 4), _chunk_path(copy2, "train", "logits", 4))
    with pytest.raises(KDCacheError, match="array 'logits', chunk 4 .* does not belong at this place"):
        kdcache.open_cache(copy2).read("logits")


def test_the_tokenizer_blob_is_bound_by_its_recorded_digest(tmp_path):
    from kdcache.cache.reader import load_cache_tokenizer
    from kdcache.cache.writer import CacheWriter

    path = tmp_path / "t.kdcache"
    writer = CacheWriter(path, {})
    writer.add_blob("tokenizer", _zip({"vocab.txt": b"[PAD]\n"}), {})
    blob = zarr.open_array(store=str(path / "tokenizer"), mode="r+")
    raw = bytearray(np.asarray(blob[:]).tobytes())
    blob[:] = np.frombuffer(_zip({"vocab.txt": b"[UNK]\n"}).ljust(len(raw), b"\0")[:len(raw)], dtype=np.uint8)
    with pytest.raises(KDCacheError, match="sha256 differs from the one recorded"):
        load_cache_tokenizer(path)


# --- 6. labels checked ---------------------------------------------------------------------------------------

def test_a_relabelled_row_is_refused_by_distill_and_verify(tmp_path, capsys, monkeypatch):
    data, teacher, cache = tabular_cache(tmp_path)
    with np.load(data / "train.npz") as npz:
        x, y = npz["x"], npz["y"].copy()
    y[37] = 1 - y[37]  # the input is untouched: only its label changed
    np.savez(data / "train.npz", x=x, y=y)
    args = ["distill", "--cache", cache, "--student", "mlp", "--student-kwargs",
            json.dumps({"in_features": 64, "hidden": 4, "depth": 1}), "--epochs", "1", "--out", tmp_path / "run",
            "--device", "cpu", "--no-progress"]
    _one_error_line(*run_cli(args, capsys, monkeypatch)[::2], "train.npz", "row 37", "has label",
                    "the labels changed since the teacher was cached")  # found as the row was first decoded
    _one_error_line(*run_cli([*args, "--check-first", "--overwrite"], capsys, monkeypatch)[::2], "row 37",
                    "1 of 120 labels differ")  # the whole split compared before training: counted
    report = verify_cache(cache, teacher=str(teacher), sample=1000, device="cpu")
    failed = {c.name: c.detail for c in report.checks if not c.ok}
    assert list(failed) == ["train/sample labels"] and "first row 37" in failed["train/sample labels"], failed


# --- 7. the writer's lock ---------------------------------------------------------------------------------------

def test_the_lock_is_shared_by_every_spelling_of_a_path(tmp_path):
    real = tmp_path / "real.kdcache"
    link = tmp_path / "link.kdcache"
    link.symlink_to(real)  # the cache does not exist yet; the link points where it will be
    with WriteLock(real):
        with pytest.raises(KDCacheError, match="another cache-teacher .* is writing this cache"):
            WriteLock(link).acquire()
    with WriteLock(link):  # released: the other spelling gets it now
        pass


def test_a_symbolic_link_planted_at_the_lock_is_never_followed(tmp_path, capsys, monkeypatch, teacher_dir):
    victim = tmp_path / "precious.txt"
    victim.write_text("do not truncate me")
    out = tmp_path / "c.kdcache"
    (tmp_path / "c.kdcache.lock").symlink_to(victim)
    code, _, err = run_cli(["cache-teacher", "--teacher", teacher_dir, "--task", "digits", "--out", out,
                            "--no-progress"], capsys, monkeypatch)
    _one_error_line(code, err, "c.kdcache.lock", "symbolic link", "refusing")
    assert victim.read_text() == "do not truncate me"
    hard = tmp_path / "d.kdcache.lock"
    os.link(victim, hard)  # a hard link to the victim: not a lock file of its own either
    with pytest.raises(KDCacheError, match="not a plain file of its own"):
        WriteLock(tmp_path / "d.kdcache").acquire()
    assert victim.read_text() == "do not truncate me"


# --- 8. bounded decompression ---------------------------------------------------------------------------------

def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_a_tokenizer_that_unpacks_beyond_the_limit_is_refused(tmp_path, monkeypatch):
    from kdcache.cache import codecs, schema as fmt
    from kdcache.cache.reader import load_cache_tokenizer
    from kdcache.cache.writer import CacheWriter

    monkeypatch.setattr(fmt, "MAX_TOKENIZER_FILES_BYTES", 1024**2)  # the real limit is 256 MiB: same code path
    bomb = _zip({"vocab.txt": b"[PAD]\n", "tokenizer.json": b"\0" * (4 * 1024**2)})
    assert len(bomb) < 64 * 1024  # 4 MiB of zeros deflate to a few KiB
    path = tmp_path / "bomb.kdcache"
    CacheWriter(path, {}).add_blob("tokenizer", bomb, {})  # recorded with its own sha256: only the size is wrong
    with pytest.raises(KDCacheError, match=r"would unpack to 4,194,3\d\d bytes \(member 'tokenizer.json'.*beyond"):
        load_cache_tokenizer(path)


def test_an_image_zip_member_beyond_the_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from kdcache.data import images
    from kdcache.data import load_split

    monkeypatch.setattr(images, "MAX_IMAGE_FILE_BYTES", 1024**2)
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png, format="PNG")
    archive = tmp_path / "images.zip"
    archive.write_bytes(_zip({"train/cat/a.png": png.getvalue(), "train/cat/b.png": b"\0" * (3 * 1024**2)}))
    split = load_split("imagefolder", archive, "train")
    assert split.dataset[0]["inputs"].shape == (3, 8, 8)
    with pytest.raises(KDCacheError, match=r"train/cat/b.png in .*images.zip: expands to 3,145,728 bytes, beyond"):
        split.dataset[1]


# --- 9. messages -----------------------------------------------------------------------------------------------

def test_a_full_disk_while_saving_last_pt_is_one_line(tmp_path, capsys, monkeypatch, chunked_cache):
    run = tmp_path / "run"
    assert run_cli(_distill_args(chunked_cache, run, "--stop-after-epoch", "1"), capsys, monkeypatch)[0] == 0
    (run / "last.pt.tmp").symlink_to("/dev/full")  # every write there fails with ENOSPC, as on a full disk
    code, _, err = run_cli(_distill_args(chunked_cache, run, "--resume"), capsys, monkeypatch)
    _one_error_line(code, err, str(run / "last.pt"), "disk full while writing it", "--resume")
    assert "enforce fail" not in err and "internal error" not in err


def test_a_read_only_run_folder_is_one_line(tmp_path, capsys, monkeypatch, chunked_cache):
    import errno

    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name == "run":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, _, err = run_cli(_distill_args(chunked_cache, tmp_path / "run"), capsys, monkeypatch)
    _one_error_line(code, err, str(tmp_path / "run"), "read-only file system")
    assert "internal error" not in err


def test_a_cache_claiming_a_trillion_rows_is_one_line_everywhere(tmp_path, capsys, monkeypatch, chunked_cache):
    copy = _copy(chunked_cache, tmp_path)
    huge = 10**12

    def edit(path: Path, change) -> None:
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))

    edit(copy / "train" / "zarr.json", lambda m: (m["attributes"].__setitem__("rows", huge),
                                                  m["attributes"]["dataset"].__setitem__("n", huge)))
    for array in ARRAYS:
        edit(copy / "train" / array / "zarr.json", lambda m: m["shape"].__setitem__(0, huge))
    needle = "chunk file missing"
    _one_error_line(*run_cli(_distill_args(copy, tmp_path / "run"), capsys, monkeypatch)[::2], needle)
    _one_error_line(*run_cli(["info", copy], capsys, monkeypatch)[::2], needle, "more chunk file problem(s)")
    code, out, _ = run_cli(["verify", copy], capsys, monkeypatch)
    assert code == 1 and "FAIL  train/chunk files" in out


# --- 10. 16-bit grayscale ------------------------------------------------------------------------------------

def test_sixteen_bit_grayscale_pngs_are_scaled_not_saturated(tmp_path):
    from PIL import Image

    from kdcache.data import load_split

    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    (tmp_path / "imgs" / "train" / "a").mkdir(parents=True)
    Image.fromarray(ramp).save(tmp_path / "imgs" / "train" / "a" / "x.png")
    assert Image.open(tmp_path / "imgs" / "train" / "a" / "x.png").mode.startswith("I")
    pixels = load_split("imagefolder", tmp_path / "imgs", "train").dataset[0]["inputs"].numpy()
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert (pixels == expected[None]).all()  # every channel: gray as RGB
    assert (pixels == 255).mean() < 0.05  # Pillow's convert("RGB") made 98% of this ramp white


def test_float_images_are_refused_in_one_line(tmp_path):
    from PIL import Image

    from kdcache.data import load_split

    (tmp_path / "imgs" / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "imgs" / "train" / "a" / "x.tiff")
    (tmp_path / "imgs" / "train" / "a" / "x.tiff").rename(tmp_path / "imgs" / "train" / "a" / "x.png")
    with pytest.raises(KDCacheError, match="x.png: F image .* convert it to 8-bit"):
        load_split("imagefolder", tmp_path / "imgs", "train").dataset[0]


# --- 11. interruptions -----------------------------------------------------------------------------------------

def test_ctrl_c_in_distill_says_where_it_stopped_and_resume_finishes(tmp_path, capsys, monkeypatch, chunked_cache):
    import kdcache.train.fit as fit_module

    real, calls = fit_module.evaluate, {"n": 0}

    def interrupted_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "evaluate", interrupted_in_epoch_two)
    run = tmp_path / "run"
    code, _, err = run_cli(_distill_args(chunked_cache, run, "--epochs", "3"), capsys, monkeypatch)
    assert code == 130 and said(err) == (f"interrupted: in epoch 2 of 3; epochs 1-1 are saved in {run / 'last.pt'}: "
                                           "rerun the same command with --resume to continue"), err
    monkeypatch.setattr(fit_module, "evaluate", real)
    code, out, err = run_cli(_distill_args(chunked_cache, run, "--epochs", "3", "--resume"), capsys, monkeypatch)
    assert code == 0 and "3/3 epochs" in out, err


def test_ctrl_c_before_the_first_epoch_is_saved_can_be_resumed(tmp_path, chunked_cache, monkeypatch):
    import kdcache.train.fit as fit_module

    monkeypatch.setattr(fit_module, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    run = tmp_path / "run"
    cfg = DistillConfig(student="mlp", student_kwargs=STUDENT_KW, cache=chunked_cache, out=run, epochs=2,
                        device="cpu", progress=False)
    with pytest.raises(Interrupted, match="in epoch 1 of 2; no epoch was finished yet: rerun the same command with "
                                          "--resume"):
        distill(cfg)
    monkeypatch.undo()
    assert distill(DistillConfig(**{**cfg.__dict__, "resume": True}))["epochs_done"] == 2


def test_ctrl_c_in_cache_teacher_says_how_far_it_got_and_the_rerun_says_where_it_resumes(
        tmp_path, capsys, monkeypatch, teacher_dir, chunked_cache):
    import kdcache.recipes.cache_teacher as recipe

    real, calls = recipe.autocast, {"n": 0}

    def interrupted_at_batch_ten(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "autocast", interrupted_at_batch_ten)
    out = tmp_path / "c.kdcache"
    args = ["cache-teacher", "--teacher", teacher_dir, "--task", "digits", "--split", "train", "--split", "validation",
            "--chunk-rows", "256", "--batch-size", "64", "--out", out, "--no-progress", "--device", "cpu"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    # batch 10 is rows 512-575 (one probe pass came first): chunks 0 and 1 were written
    assert code == 130 and err.strip() == ("interrupted: after row 512 of 1437 of split 'train' (rows 0-511 are "
                                           "stored); rerun the same command to continue"), err
    monkeypatch.setattr(recipe, "autocast", real)
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0 and "kdcache: resuming split 'train' at row 512 of 1437" in err, err
    for split in ("train", "validation"):
        for array in ARRAYS:
            assert np.array_equal(kdcache.open_cache(out, split).read(array),
                                  kdcache.open_cache(chunked_cache, split).read(array)), (split, array)


# --- 12. review of #10: the fixes hold --------------------------------------------------------------------------

def _cache_teacher_args(teacher_dir, out):
    return ["cache-teacher", "--teacher", teacher_dir, "--task", "digits", "--split", "train", "--chunk-rows", "256",
            "--batch-size", "64", "--out", out, "--no-progress", "--device", "cpu"]


def test_a_resumed_capture_refuses_chunks_swapped_before_the_resume(tmp_path, capsys, monkeypatch, teacher_dir):
    import kdcache.recipes.cache_teacher as recipe
    from kdcache.cache.reader import TeacherCache

    out = tmp_path / "c.kdcache"
    args = _cache_teacher_args(teacher_dir, out)
    real = recipe.autocast
    interrupt_autocast_at(monkeypatch, 10)  # rows 512-575: chunks 0 and 1 are stored
    assert run_cli(args, capsys, monkeypatch)[0] == 130
    monkeypatch.setattr(recipe, "autocast", real)
    stored = TeacherCache(out, "train", allow_incomplete=True, check_chunks=False)
    first, second = stored.chunk_file("logits", 0), stored.chunk_file("logits", 1)
    a, b = first.read_bytes(), second.read_bytes()
    assert a != b
    first.write_bytes(b)  # each chunk is whole and passes its own checksum: only its place is wrong
    second.write_bytes(a)
    code, _, err = run_cli(args, capsys, monkeypatch)
    _one_error_line(code, err, "are not the ones that were written", "--overwrite")
    assert "resuming split" not in err
    assert zarr.open_group(str(out), mode="r").attrs["complete"] is False


def test_a_removed_chunk_manifest_or_tokenizer_digest_does_not_switch_the_check_off(tmp_path, capsys, monkeypatch,
                                                                                    chunked_cache):
    copy = _copy(chunked_cache, tmp_path)
    meta_path = copy / "train" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["chunk_digests"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(KDCacheError, match=r"train/zarr.json: the split has no chunk manifest, but the cache was "
                                           r"written with one \(it was removed\)"):
        kdcache.open_cache(copy)
    _one_error_line(*run_cli(_distill_args(copy, tmp_path / "run"), capsys, monkeypatch)[::2], "no chunk manifest",
                    "removed")
    code, out, _ = run_cli(["verify", copy], capsys, monkeypatch)
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert code == 1 and any("train/chunk manifest" in line and "no chunk manifest" in line and "removed" in line
                             for line in failed), out

    from kdcache.cache.reader import load_cache_tokenizer
    from kdcache.cache.writer import CacheWriter

    path = tmp_path / "t.kdcache"
    CacheWriter(path, {}).add_blob("tokenizer", _zip({"vocab.txt": b"[PAD]\n"}), {})
    assert json.loads((path / "zarr.json").read_text())["attributes"]["chunk_manifests"] is True
    blob_meta = json.loads((path / "tokenizer" / "zarr.json").read_text())
    del blob_meta["attributes"]["sha256"]
    (path / "tokenizer" / "zarr.json").write_text(json.dumps(blob_meta))
    with pytest.raises(KDCacheError, match=r"tokenizer has no recorded sha256, but the cache was written with one "
                                           r"\(it was removed\)"):
        load_cache_tokenizer(path)


def test_resume_of_a_finished_run_without_last_pt_refuses_instead_of_starting_over(tmp_path, capsys, monkeypatch,
                                                                                  chunked_cache):
    run = tmp_path / "run"
    assert run_cli(_distill_args(chunked_cache, run, "--epochs", "3"), capsys, monkeypatch)[0] == 0
    metrics = (run / "metrics.jsonl").read_text()
    assert len(metrics.splitlines()) == 3
    (run / "last.pt").unlink()
    code, _, err = run_cli(_distill_args(chunked_cache, run, "--epochs", "3", "--resume"), capsys, monkeypatch)
    _one_error_line(code, err, str(run / "last.pt"), "nothing to resume")
    assert (run / "metrics.jsonl").read_text() == metrics  # not deleted, not restarted
    assert not (run / "last.pt").exists()


def test_a_full_disk_while_writing_best_is_one_line(tmp_path, capsys, monkeypatch, chunked_cache):
    import errno

    import kdcache.runtime as runtime

    real_fsync = runtime.os.fsync

    def full_under_best(fd):
        if "best.tmp" in Path(os.readlink(f"/proc/self/fd/{fd}")).parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(runtime.os, "fsync", full_under_best)
    run = tmp_path / "run"
    code, _, err = run_cli(_distill_args(chunked_cache, run), capsys, monkeypatch)
    _one_error_line(code, err, str(run / "best.tmp" / "model.pt"), "disk full while writing it", "--resume")
    assert "internal error" not in err and "enforce fail" not in err
    assert (run / "last.pt").is_file() and not (run / "best").exists()
    assert not (run / "best.tmp" / "model.pt.tmp").exists()  # the half-written file is removed


def test_an_image_file_linked_to_a_device_is_refused_not_read_without_end(tmp_path):
    from PIL import Image

    from kdcache.data import load_split

    folder = tmp_path / "imgs" / "train" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "b.png").symlink_to("/dev/zero")  # fstat says size 0; reading it never ends
    split = load_split("imagefolder", tmp_path / "imgs", "train")
    assert len(split) == 2 and split.dataset[0]["inputs"].shape == (3, 8, 8)
    with pytest.raises(KDCacheError, match=r"b\.png: not a regular file"):
        split.dataset[1]


def test_an_edited_chunk_shape_is_refused_at_open(tmp_path, chunked_cache):
    copy = _copy(chunked_cache, tmp_path)
    assert json.loads((copy / "zarr.json").read_text())["attributes"]["storage"]["chunk_rows"] == 256
    meta_path = copy / "train" / "logits" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 512
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(KDCacheError, match=r"train/logits/zarr.json: chunks of 512 rows .*, but the cache records "
                                           r"256 rows per chunk"):
        kdcache.open_cache(copy)
    assert kdcache.open_cache(copy, "validation").chunk_rows == 256  # only the edited split is refused


def test_ctrl_c_in_cache_teacher_before_the_first_chunk_says_no_rows_are_stored(tmp_path, capsys, monkeypatch,
                                                                              teacher_dir):
    out = tmp_path / "c.kdcache"
    interrupt_autocast_at(monkeypatch, 2)  # the first batch after the probe: rows 0-63, no chunk stored yet
    code, _, err = run_cli(_cache_teacher_args(teacher_dir, out), capsys, monkeypatch)
    assert code == 130 and err.strip() == ("interrupted: after row 0 of 1437 of split 'train' (no rows are stored "
                                           "yet); rerun the same command to continue"), err
