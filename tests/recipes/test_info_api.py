"""Issue 2, points 4 and 5 and "docs describe what exists": `kdcache info` (text and --json), the
`kdcache.open_cache` API, and docs/cli.md + docs/cache-format.md checked against the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import typer.main
import zarr

import kdcache
from conftest import REPO
from kdcache.cache import codecs, schema as fmt
from kdcache.cli.main import app
from kdcache.data import DataOptions
from kdcache.errors import KDCacheError
from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
from teachers_for_tests import linear_digits
from helpers import run_cli

CHUNK = 256


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """A complete two-split cache of a linear teacher on the bundled digits, small chunks so reads can be partial."""
    root = tmp_path_factory.mktemp("info")
    torch.manual_seed(0)
    weights = root / "linear.pt"
    torch.save(linear_digits().state_dict(), weights)
    cfg = CacheTeacherConfig(teacher="teachers_for_tests:linear_digits", trust_model_code=True, weights=str(weights), task="digits",
                             out=root / "digits.kdcache", splits=("train", "validation"), device="cpu",
                             progress=False, chunk_rows=CHUNK, data_options=DataOptions())
    return cache_teacher(cfg)


def _files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- kdcache info

def test_info_json_reports_size_ratio_and_completeness(digits_cache, capsys, monkeypatch):
    code, stdout, err = run_cli(["info", digits_cache, "--json"], capsys, monkeypatch)
    assert code == 0 and err == ""
    info = json.loads(stdout)  # stdout is nothing but the JSON document
    assert info["complete"] is True and info["format"] == fmt.FORMAT_NAME and info["format_version"] == 1
    assert info["size_on_disk"] == _files_bytes(digits_cache)
    assert info["teacher"]["num_outputs"] == 10 and info["task"]["kind"] == "classification"
    assert info["storage"]["logits_dtype"] == "float16" and info["storage"]["codec"] == codecs.DEFAULT_CODEC
    by_name = {s["name"]: s for s in info["splits"]}
    assert sorted(by_name) == ["train", "validation"]
    for name, rows in (("train", 1437), ("validation", 360)):
        s = by_name[name]
        stored = _files_bytes(digits_cache / name / "logits")
        assert s["rows"] == rows and s["logits_shape"] == [rows, 10] and s["logits_dtype"] == "float16"
        assert s["labels_dtype"] == "int64" and s["chunk_rows"] == CHUNK and s["complete"] is True
        assert s["logits_bytes_raw"] == rows * 10 * 2 and s["logits_bytes_stored"] == stored
        assert s["compression_ratio"] == round(rows * 20 / stored, 2) and s["compression_ratio"] > 0.5
        assert s["bytes_per_sample"] == round(stored / rows, 2)
        assert s["digest"] == kdcache.open_cache(digits_cache, name).split_attrs["dataset"]["digest"]


def test_info_text_shows_what_a_person_needs(digits_cache, capsys, monkeypatch):
    code, stdout, _ = run_cli(["info", digits_cache], capsys, monkeypatch)
    info = json.loads(run_cli(["info", digits_cache, "--json"], capsys, monkeypatch)[1])
    assert code == 0
    assert f"{fmt.FORMAT_NAME} v1" in stdout and "complete" in stdout and "INCOMPLETE" not in stdout
    assert "teachers_for_tests:linear_digits" in stdout and "10 outputs" in stdout
    assert info["teacher"]["sha256"][:16] in stdout
    assert re.search(r"\d+(\.\d)? (B|KiB|MiB) on disk", stdout)
    for s in info["splits"]:
        assert re.search(rf"{s['name']}\s*│\s*{s['rows']}\s*│\s*\[{s['rows']}, 10\] float16", stdout), stdout
        assert f"{s['compression_ratio']}x" in stdout and str(s["bytes_per_sample"]) in stdout


def test_info_on_an_incomplete_cache_says_so(digits_cache, tmp_path, capsys, monkeypatch):
    import shutil

    copy = tmp_path / "copy.kdcache"
    shutil.copytree(digits_cache, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["complete"] = False
    (copy / "zarr.json").write_text(json.dumps(meta))
    code, stdout, _ = run_cli(["info", copy], capsys, monkeypatch)
    assert code == 0 and "INCOMPLETE (not usable)" in stdout
    assert json.loads(run_cli(["info", copy, "--json"], capsys, monkeypatch)[1])["complete"] is False
    with pytest.raises(KDCacheError, match="incomplete"):
        kdcache.open_cache(copy)


def test_info_on_something_that_is_not_a_cache(tmp_path, capsys, monkeypatch):
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    code, stdout, err = run_cli(["info", tmp_path / "plain.zarr", "--json"], capsys, monkeypatch)
    assert code == 1 and stdout == ""
    assert err.strip() == f"error: {tmp_path / 'plain.zarr'}: not a kdcache cache (format attribute is None)"


# ---------------------------------------------------------------------------------------------- open_cache

def test_open_cache_exposes_the_promised_attributes(digits_cache):
    cache = kdcache.open_cache(digits_cache, split="validation")
    assert len(cache) == 360
    assert cache.logits.shape == (360, 10) and cache.logits.dtype == np.float16
    assert cache.labels.shape == (360,) and cache.labels.dtype == np.int64
    assert cache.index.dtype == np.int64 and cache.fingerprint.dtype == np.uint64
    assert isinstance(cache.attrs, dict) and cache.attrs["complete"] is True
    assert cache.attrs["splits"] == ["train", "validation"]
    # numpy-compatible: np.asarray and numpy functions work on the arrays directly
    full = np.asarray(cache.logits)
    assert isinstance(full, np.ndarray) and full.shape == (360, 10)
    np.testing.assert_array_equal(full[5:9], cache.logits[5:9])
    assert np.argmax(np.asarray(cache.logits), axis=1).shape == (360,)
    assert len(set(cache.fingerprint[:].tolist())) > 300  # content hashes, not a counter
    with pytest.raises(Exception):
        cache.labels[0] = 3  # read-only


def test_logits_are_read_lazily_chunk_by_chunk(digits_cache, tmp_path):
    """A damaged chunk does not stop a cache from opening or other rows from being read; reading it fails (CRC32C)."""
    import shutil

    copy = tmp_path / "damaged.kdcache"
    shutil.copytree(digits_cache, copy)
    chunk = copy / "train" / "logits" / "c" / "2" / "0"  # rows 512..767
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    cache = kdcache.open_cache(copy, "train")  # opening reads no chunk
    np.testing.assert_array_equal(cache.logits[:CHUNK], kdcache.open_cache(digits_cache, "train").logits[:CHUNK])
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        cache.logits[2 * CHUNK: 2 * CHUNK + 1]


# ---------------------------------------------------------------------------------------------- docs

def _documented_flags() -> str:
    return (REPO / "docs" / "cli.md").read_text()


@pytest.mark.parametrize("command", ["cache-teacher", "info", "demo"])
def test_cli_doc_names_every_flag_of_the_stage_one_commands(command):
    doc = _documented_flags()
    click_command = typer.main.get_command(app).commands[command]
    for param in click_command.params:
        names = [o for o in param.opts + param.secondary_opts if o.startswith("--")]
        if not names:  # a positional argument: the usage line names it
            assert param.name.upper() in doc, param.name
            continue
        assert any(re.search(rf"`{re.escape(n)}\b", doc) for n in names), f"{command} {names} not in docs/cli.md"


def test_cli_doc_lists_every_task_and_precision():
    from kdcache.data import TASKS
    from kdcache.runtime import PRECISIONS

    doc = _documented_flags()
    for task in TASKS:
        assert f"`{task}`" in doc, task
    for precision in PRECISIONS:
        assert f"`{precision}`" in doc or f"{precision}|" in doc or f"|{precision}" in doc, precision


def _table_keys(doc: str, heading: str) -> set[str]:
    section = doc.split(heading, 1)[1].split("\n## ", 1)[0]
    return {k for row in re.findall(r"^\| ([^|]+) \|", section, re.M) for k in re.findall(r"`([a-z_]+)`", row)}


def test_cache_format_doc_describes_every_attribute_a_cache_holds(digits_cache):
    doc = (REPO / "docs" / "cache-format.md").read_text()
    cache = kdcache.open_cache(digits_cache, "train")
    assert set(cache.attrs) <= _table_keys(doc, "## Root attributes")
    assert set(cache.split_attrs) <= _table_keys(doc, "## Split attributes")
    for key in cache.split_attrs["dataset"]:
        assert f"`{key}`" in doc, key
    for key in cache.attrs["teacher"]:
        assert f"`{key}`" in doc, key
    for name in codecs.CODECS:
        assert f"`{name}`" in doc, name
    assert f"**Format version:** `{fmt.FORMAT_VERSION}`" in doc and f"`{fmt.FORMAT_NAME}`" in doc
    group = zarr.open_group(str(digits_cache), mode="r")
    for name in fmt.BASE_ARRAYS:
        assert re.search(rf"^\s+{name}\s+\[N", doc, re.M), name
        assert group["train"][name].dtype.name in doc.split("## Layout", 1)[1].split("## Arrays", 1)[0]
