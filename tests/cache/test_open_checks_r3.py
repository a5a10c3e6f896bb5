"""Trust, round three (issue 19, points 6 and 11): every attribute that decides how a cache is read is checked when
it is opened, and a hand-damaged attribute is one line naming its zarr.json, in open_cache, info, verify and distill.

Each test edits one zarr.json of a freshly written cache (a copy), as a careless hand would, and asserts the refusal
by the library and by every command that reads a cache; distill must refuse before it trains.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import kdcache
from kdcache.errors import KDCacheError
from helpers import _distill_args, _one_error_line, run_cli


def _copy(cache: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy.kdcache"
    shutil.copytree(cache, copy)
    return copy


def _edit(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _attrs(edit):
    return lambda meta: edit(meta["attributes"])


def _refused_everywhere(copy: Path, tmp_path: Path, capsys, monkeypatch, *needles: str, distill: list | None = None
                        ) -> None:
    """open_cache raises; info and distill print one error line; verify fails with a check (or error) line holding
    the needles; distill wrote no metrics (it never trained); nothing says internal error."""
    with pytest.raises(KDCacheError) as caught:
        kdcache.open_cache(copy, "train")
    for needle in needles:
        assert needle in str(caught.value), (needle, str(caught.value))
    assert len(str(caught.value).splitlines()) == 1
    _one_error_line(*run_cli(["info", copy], capsys, monkeypatch)[::2], *needles)
    run = tmp_path / "run"
    _one_error_line(*run_cli(distill or _distill_args(copy, run), capsys, monkeypatch)[::2], *needles)
    assert not (run / "metrics.jsonl").exists()
    code, out, err = run_cli(["verify", copy], capsys, monkeypatch)
    assert code == 1 and "internal error" not in out + err, out + err
    lines = [line for line in (out + err).splitlines() if line.startswith(("FAIL", "error: "))]
    assert lines and all(needle in lines[0] for needle in needles), (needles, out + err)


# --- 6. array metadata against the schema --------------------------------------------------------------------

def test_logits_dtype_edited_to_int16_is_refused_and_distill_does_not_train(tmp_path, capsys, monkeypatch,
                                                                            digits_cache):
    """The bytes and the chunk manifest are unchanged: only the dtype in the zarr.json says int16."""
    copy = _copy(digits_cache, tmp_path)
    _edit(copy / "train" / "logits" / "zarr.json", lambda meta: meta.update(data_type="int16", fill_value=0))
    _refused_everywhere(copy, tmp_path, capsys, monkeypatch, str(copy / "train" / "logits" / "zarr.json"),
                        "dtype int16", "float16")


def test_int16_with_the_nan_fill_value_left_names_the_array_file(tmp_path, capsys, monkeypatch, digits_cache):
    copy = _copy(digits_cache, tmp_path)
    _edit(copy / "train" / "logits" / "zarr.json", lambda meta: meta.update(data_type="int16"))
    _refused_everywhere(copy, tmp_path, capsys, monkeypatch, str(copy / "train" / "logits" / "zarr.json"),
                        "unreadable Zarr metadata")


ARRAY_EDITS = {
    "labels dtype": ("labels", lambda meta: meta.update(data_type="int32"), "dtype int32"),
    "blosc typesize": ("logits", lambda meta: meta["codecs"][1]["configuration"].update(typesize=4), "has codecs"),
    "compressor": ("fingerprint", lambda meta: meta["codecs"].pop(1), "has codecs"),
    "checksum removed": ("index", lambda meta: meta["codecs"].pop(), "has codecs"),
    "chunk shape": ("logits", lambda meta: meta["chunk_grid"]["configuration"]["chunk_shape"].__setitem__(0, 512),
                    "chunks of 512 rows"),
}


@pytest.mark.parametrize("edit", ARRAY_EDITS)
def test_an_edited_array_attribute_is_refused_at_open(tmp_path, capsys, monkeypatch, digits_cache, edit):
    array, change, needle = ARRAY_EDITS[edit]
    copy = _copy(digits_cache, tmp_path)
    _edit(copy / "train" / array / "zarr.json", change)
    _refused_everywhere(copy, tmp_path, capsys, monkeypatch, str(copy / "train" / array / "zarr.json"), needle)


# --- 11. attribute types damaged by hand ---------------------------------------------------------------------

TYPE_EDITS = {
    "root teacher": ("zarr.json", _attrs(lambda a: a.update(teacher=[])), "attribute teacher"),
    "split dataset": ("train/zarr.json", _attrs(lambda a: a.update(dataset=[])), "attribute dataset"),
    "preprocess.limit": ("train/zarr.json", _attrs(lambda a: a["dataset"]["preprocess"].update(limit="10")),
                         "attribute dataset.preprocess.limit"),
    "task.label_names": ("zarr.json", _attrs(lambda a: a["task"].update(label_names=5)), "attribute task.label_names"),
    "task.kind unknown": ("zarr.json", _attrs(lambda a: a["task"].update(kind="ranking")), "attribute task.kind"),
    "teacher.num_outputs": ("zarr.json", _attrs(lambda a: a["teacher"].update(num_outputs="10")),
                            "attribute teacher.num_outputs"),
    "storage.logits_dtype": ("zarr.json", _attrs(lambda a: a["storage"].update(logits_dtype="int16")),
                             "attribute storage.logits_dtype"),
}


@pytest.mark.parametrize("edit", TYPE_EDITS)
def test_a_damaged_attribute_type_is_one_line_naming_file_and_attribute(tmp_path, capsys, monkeypatch, digits_cache,
                                                                         edit):
    file, change, needle = TYPE_EDITS[edit]
    copy = _copy(digits_cache, tmp_path)
    _edit(copy / file, change)
    _refused_everywhere(copy, tmp_path, capsys, monkeypatch, str(copy / file), needle)


def test_task_kind_edited_to_regression_is_refused_by_the_labels_dtype(tmp_path, capsys, monkeypatch, digits_cache):
    copy = _copy(digits_cache, tmp_path)
    _edit(copy / "zarr.json", _attrs(lambda a: a["task"].update(kind="regression")))
    _refused_everywhere(copy, tmp_path, capsys, monkeypatch, str(copy / "train" / "labels" / "zarr.json"),
                        "dtype int64", "task.kind 'regression'")


# --- 6. what binds task.modality and dataset.preprocess -------------------------------------------------------

BINDING_EDITS = {
    "task.modality": ("zarr.json", _attrs(lambda a: a["task"].update(modality="image")),
                      "attribute task.modality is 'image', but task 'digits' is read as 'features'"),
    "dataset.modality": ("train/zarr.json", _attrs(lambda a: a["dataset"].update(modality="text")),
                         "attribute dataset.modality is 'text'"),
    "task.name": ("zarr.json", _attrs(lambda a: a["task"].update(name="tabular")), "write_settings.task records"),
    "storage.codec": ("zarr.json", _attrs(lambda a: a["storage"].update(codec="zstd3")),
                      "write_settings.storage.codec records"),
    "dataset.label_names": ("train/zarr.json", _attrs(lambda a: a["dataset"].update(label_names=list("abcdefghij"))),
                            "attribute dataset.label_names"),
}


@pytest.mark.parametrize("edit", BINDING_EDITS)
def test_an_attribute_that_decides_how_data_is_read_is_bound(tmp_path, capsys, monkeypatch, digits_cache, edit):
    file, change, needle = BINDING_EDITS[edit]
    copy = _copy(digits_cache, tmp_path)
    _edit(copy / file, change)
    _refused_everywhere(copy, tmp_path, capsys, monkeypatch, str(copy / file), needle)


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory, cifar10_zip):
    """A seeded ResNet-8 cached on 16 real CIFAR-10 JPEGs per split, normalised with the CIFAR-10 statistics."""
    import torch

    from kdcache.data import DataOptions
    from kdcache.models import resnet8
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher

    root = tmp_path_factory.mktemp("images")
    torch.manual_seed(0)
    torch.save(resnet8(10).state_dict(), root / "t.pt")
    return cache_teacher(CacheTeacherConfig(teacher="resnet8", weights=str(root / "t.pt"), task="imagefolder",
                                            data=str(cifar10_zip), out=root / "c.kdcache", splits=("train", "test"),
                                            device="cpu", progress=False,
                                            data_options=DataOptions(limit=16, normalize="cifar10")))


def _image_distill_args(cache: Path, out: Path) -> list:
    return ["distill", "--cache", cache, "--student", "resnet8", "--epochs", "1", "--batch-size", "8", "--out", out,
            "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("where", ["dataset", "write_settings"])
def test_an_edited_normalisation_is_refused_not_trained_on_raw_pixels(tmp_path, capsys, monkeypatch, image_cache,
                                                                      where):
    copy = _copy(image_cache, tmp_path)
    if where == "dataset":
        _edit(copy / "train" / "zarr.json", _attrs(lambda a: a["dataset"]["preprocess"].update(normalize="none")))
        needle = "normalize 'none' here, 'cifar10' there"
    else:
        _edit(copy / "zarr.json",
              _attrs(lambda a: a["write_settings"]["data"]["train"]["preprocess"].update(normalize="none")))
        needle = "normalize 'cifar10' here, 'none' there"
    _refused_everywhere(copy, tmp_path, capsys, monkeypatch, str(copy / "train" / "zarr.json"),
                        "attribute dataset.preprocess differs", needle,
                        distill=_image_distill_args(copy, tmp_path / "run"))


def test_an_unedited_image_cache_opens_and_trains(tmp_path, capsys, monkeypatch, image_cache):
    """The checks above refuse edits, not caches: the same cache as written opens, verifies and trains."""
    assert len(kdcache.open_cache(image_cache, "train")) == 16
    assert run_cli(["verify", image_cache], capsys, monkeypatch)[0] == 0
    code, _, err = run_cli(_image_distill_args(image_cache, tmp_path / "run"), capsys, monkeypatch)
    assert code == 0, err


def test_removing_the_recorded_preprocess_does_not_switch_the_binding_off(tmp_path, capsys, monkeypatch,
                                                                          digits_cache):
    copy = _copy(digits_cache, tmp_path)
    _edit(copy / "zarr.json", _attrs(lambda a: a["write_settings"]["data"].pop("train")))
    _refused_everywhere(copy, tmp_path, capsys, monkeypatch, str(copy / "train" / "zarr.json"),
                        "write_settings.data records nothing for split 'train'")


def test_a_cache_written_by_a_script_without_write_settings_still_opens(tmp_path):
    """CacheWriter takes any header; a script that records no write_settings gets no preprocessing binding."""
    import numpy as np

    from kdcache.cache.writer import CacheWriter

    writer = CacheWriter(tmp_path / "c.kdcache", {"teacher": {"num_outputs": 3}, "task": {"name": "tabular",
                                                                                           "modality": "features"}})
    split = writer.add_split("train", num_outputs=3, rows=5, codec="zstd3", chunk_rows=4)
    split.write({"logits": np.zeros((5, 3), np.float16), "labels": np.arange(5) % 3, "index": np.arange(5),
                 "fingerprint": np.arange(5, dtype=np.uint64)})
    split.close({"task": "tabular", "modality": "features", "n": 5, "preprocess": {"limit": 5}})
    writer.finalize()
    assert len(kdcache.open_cache(tmp_path / "c.kdcache")) == 5
