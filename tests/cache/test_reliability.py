"""A cache users can trust (issue 4): damage is detected on read and by `kdcache verify`, hand-edited or foreign
caches are refused, a wrong teacher is caught, many readers share one cache without changing it, and every bad
input is one `error: ...` line with a non-zero exit (tracebacks only with `kdcache --debug`).

Each promise of docs/reliability.md names the test here that proves it.
"""

from __future__ import annotations

import json
import re
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import kdcache
from kdcache.errors import KDCacheError
from kdcache.cache.reader import TeacherCache
from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
from kdcache.recipes.verify import tolerance, verify_cache
from cache_edits import refresh_manifest
from teachers_for_tests import linear_digits, make_tiny_bert
from helpers import _one_error_line, run_cli
from helpers import _distill_args

REPO = Path(__file__).resolve().parents[2]
ARRAYS = ("logits", "labels", "index", "fingerprint")
DAMAGE = ("flip", "truncate", "delete")
CHUNK = 256  # digits train: 1437 rows = 6 chunks (the last one partial), validation: 360 rows = 2 chunks
TEACHER = "teachers_for_tests:linear_digits"


# --- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Two linear digits teachers with different weights: the cache's own (a) and a wrong one (b)."""
    root = tmp_path_factory.mktemp("weights")
    paths = []
    for seed, name in ((0, "a.pt"), (1, "b.pt")):
        torch.manual_seed(seed)
        torch.save(linear_digits().state_dict(), root / name)
        paths.append(root / name)
    return tuple(paths)


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory, weights):
    """Teacher (a) cached on the bundled digits, train and validation, in chunks of 256 rows."""
    out = tmp_path_factory.mktemp("digits") / "c.kdcache"
    return cache_teacher(CacheTeacherConfig(teacher=TEACHER, trust_model_code=True, weights=str(weights[0]), task="digits", out=out,
                                            splits=("train", "validation"), chunk_rows=CHUNK, device="cpu",
                                            progress=False))


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory, sst2_copy, tiny_tokenizer):  # noqa: F811 - the imported fixture
    """A tiny BERT cached on real SST-2 rows; the teacher folder is kept for `verify --teacher`."""
    root = tmp_path_factory.mktemp("text")
    teacher = make_tiny_bert(root / "teacher", tiny_tokenizer)
    cache = cache_teacher(CacheTeacherConfig(teacher=str(teacher), task="sst2", data=str(sst2_copy),
                                             out=root / "c.kdcache", splits=("train", "validation"), batch_size=16,
                                             device="cpu", progress=False))
    return cache, teacher


def _copy(cache: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy.kdcache"
    shutil.copytree(cache, copy)
    return copy


def _chunk_file(cache: Path, split: str, array: str, chunk: int) -> Path:
    return TeacherCache(cache, split, check_chunks=False).chunk_file(array, chunk)


def _damage(path: Path, how: str) -> None:
    """What disks and careless hands do to a file: one flipped byte, a lost tail, or the whole file."""
    if how == "delete":
        path.unlink()
        return
    raw = bytearray(path.read_bytes())
    if how == "flip":
        raw[len(raw) // 2] ^= 0x01
    else:
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _verify(args, capsys, monkeypatch):
    """`kdcache verify ARGS`: (exit code, check lines, stderr)."""
    code, out, err = run_cli(["verify", *args], capsys, monkeypatch)
    return code, out.strip().splitlines(), err


def _failed(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("FAIL")]


# --- integrity on read -------------------------------------------------------------------------------------------

def test_read_returns_the_stored_rows(digits_cache):
    cache = kdcache.open_cache(digits_cache, "train")
    np.testing.assert_array_equal(cache.read("logits"), cache.logits[:])
    np.testing.assert_array_equal(cache.read("labels", 250, 700), cache.labels[250:700])
    assert cache.read("index", 5, 5).shape == (0,)
    with pytest.raises(KDCacheError, match="has no array 'weights' .it holds logits, labels, index, fingerprint"):
        cache.read("weights")


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("array", ARRAYS)
def test_damaged_chunk_is_one_line_naming_split_array_chunk_and_file(tmp_path, digits_cache, array, how):
    copy = _copy(digits_cache, tmp_path)
    bad = _chunk_file(copy, "train", array, 2)  # rows 512:768
    _damage(bad, how)
    named = (f"split 'train', array '{array}', chunk 2 (rows 512:768)", str(bad))
    if how == "delete":
        # Zarr alone would read a missing chunk as its fill value: NaN logits, zero labels, without a word.
        silent = zarr.open_group(str(copy), mode="r")["train"][array][512:768]
        assert np.isnan(silent).all() if array == "logits" else (silent == 0).all()
        with pytest.raises(KDCacheError) as excinfo:
            kdcache.open_cache(copy, "train")
        assert "chunk file missing" in str(excinfo.value)
    else:
        cache = kdcache.open_cache(copy, "train")  # opening reads no chunk
        np.testing.assert_array_equal(cache.read(array, 0, 512), kdcache.open_cache(digits_cache).read(array, 0, 512))
        with pytest.raises(KDCacheError) as excinfo:
            cache.read(array)  # the whole array: the bad chunk is located by re-reading chunk by chunk
        assert "CRC32C checksum mismatch" in str(excinfo.value)
    message = str(excinfo.value)
    assert "\n" not in message and all(part in message for part in named), message


def test_files_that_are_not_chunks_do_not_make_a_cache_unusable(tmp_path, digits_cache):
    """A writer's leftover temporary file or a desktop's .DS_Store is no chunk: only chunk-named files count."""
    copy = _copy(digits_cache, tmp_path)
    (copy / "train" / "logits" / ".DS_Store").write_bytes(b"x")
    (copy / "train" / "labels" / "c" / "3.partial").write_bytes(b"x")
    assert len(kdcache.open_cache(copy, "train")) == 1437 and verify_cache(copy).ok


@pytest.mark.parametrize("how,stream", [("flip", "memory"), ("truncate", "chunks"), ("delete", "auto")])
def test_distill_refuses_a_damaged_cache_in_one_line(tmp_path, capsys, monkeypatch, digits_cache, how, stream):
    copy = _copy(digits_cache, tmp_path)
    bad = _chunk_file(copy, "train", "logits", 3)
    _damage(bad, how)
    args = _distill_args(copy, tmp_path / "r", "--epochs", "1", "--stream", stream)
    code, _, err = run_cli(args, capsys, monkeypatch)
    _one_error_line(code, err, "split 'train', array 'logits', chunk 3", str(bad))


def test_damaged_labels_and_fingerprints_stop_distill_before_training(tmp_path, capsys, monkeypatch, digits_cache):
    for array in ("labels", "fingerprint"):
        copy = tmp_path / array / "c.kdcache"
        shutil.copytree(digits_cache, copy)
        bad = _chunk_file(copy, "validation", array, 1)
        _damage(bad, "flip")
        code, _, err = run_cli(_distill_args(copy, tmp_path / array / "r", "--epochs", "1"), capsys, monkeypatch)
        _one_error_line(code, err, f"split 'validation', array '{array}', chunk 1", str(bad))
        assert not (tmp_path / array / "r" / "metrics.jsonl").exists()


def test_damaged_split_metadata_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, digits_cache):
    copy = _copy(digits_cache, tmp_path)
    (copy / "train" / "zarr.json").write_text("{not json")
    code, _, err = run_cli(_distill_args(copy, tmp_path / "r"), capsys, monkeypatch)
    _one_error_line(code, err, str(copy / "train" / "zarr.json"), "unreadable Zarr metadata")
    _one_error_line(*_verify([copy], capsys, monkeypatch)[::2], str(copy / "train" / "zarr.json"))


# --- hand-edited attributes --------------------------------------------------------------------------------------

def _set_rows(copy: Path, n: int, *, attrs: bool = True, dataset: bool = True, arrays=ARRAYS) -> None:
    def split_attrs(meta):
        if attrs:
            meta["attributes"]["rows"] = n
        if dataset:
            meta["attributes"]["dataset"]["n"] = n

    _edit_json(copy / "train" / "zarr.json", split_attrs)
    for name in arrays:
        _edit_json(copy / "train" / name / "zarr.json", lambda meta: meta["shape"].__setitem__(0, n))


WRONG_N = {
    "rows attribute": (dict(n=1500, dataset=False, arrays=()), "row counts disagree"),
    "dataset.n": (dict(n=1500, attrs=False, arrays=()), "row counts disagree"),
    "one array's shape": (dict(n=1500, attrs=False, dataset=False, arrays=("logits",)), "row counts disagree"),
    "every N, smaller": (dict(n=1000), "lies outside the array's 1000 rows"),
    "every N, larger": (dict(n=1600), "chunk 6 (rows 1536:1600): chunk file missing"),
}


@pytest.mark.parametrize("edit", WRONG_N)
def test_attributes_edited_to_a_wrong_n_are_refused(tmp_path, capsys, monkeypatch, digits_cache, edit):
    kwargs, needle = WRONG_N[edit]
    copy = _copy(digits_cache, tmp_path)
    _set_rows(copy, **kwargs)
    with pytest.raises(KDCacheError, match=re.escape(needle)):
        kdcache.open_cache(copy, "train")
    _one_error_line(*run_cli(_distill_args(copy, tmp_path / "r"), capsys, monkeypatch)[::2], needle)
    code, lines, _ = _verify([copy], capsys, monkeypatch)
    assert code == 1 and any(needle in line for line in _failed(lines)), lines


def test_a_consistent_wrong_n_within_the_last_chunk_is_caught_by_the_data_and_the_digest(
        tmp_path, capsys, monkeypatch, digits_cache):
    """Every N edited to 1400 (still 6 chunk files): the cache opens; the data (distill) and digest (verify) differ."""
    copy = _copy(digits_cache, tmp_path)
    _set_rows(copy, 1400)
    refresh_manifest(copy)  # edited consistently, the chunk manifest too
    assert len(kdcache.open_cache(copy, "train")) == 1400
    _one_error_line(*run_cli(_distill_args(copy, tmp_path / "r"), capsys, monkeypatch)[::2], "1437 rows", "1400")
    code, lines, _ = _verify([copy], capsys, monkeypatch)
    assert code == 1 and [line.split(":")[0] for line in _failed(lines)] == ["FAIL  train/digest"], lines


def test_a_cache_from_a_newer_format_version_is_refused_by_every_command(tmp_path, capsys, monkeypatch, digits_cache):
    copy = _copy(digits_cache, tmp_path)
    _edit_json(copy / "zarr.json", lambda meta: meta["attributes"].__setitem__("format_version", 3))  # kdcache reads 2
    _one_error_line(*run_cli(_distill_args(copy, tmp_path / "r"), capsys, monkeypatch)[::2], "version 3", "upgrade")
    _one_error_line(*_verify([copy], capsys, monkeypatch)[::2], "version 3", "upgrade")
    _one_error_line(*run_cli(["info", copy], capsys, monkeypatch)[::2], "version 3")
    monkeypatch.setattr("sys.argv", ["kdcache", "--debug", "verify", str(copy)])
    from kdcache.cli.main import main

    with pytest.raises(KDCacheError, match="version 3"):  # --debug: the traceback, not the one line
        main()


# --- bad input to cache-teacher and distill ---------------------------------------------------------------------

@pytest.mark.parametrize("content,needle", [("", "empty file"), ("sentence\tlabel\n", "no data rows")])
def test_an_empty_dataset_file_is_refused_by_cache_teacher(tmp_path, capsys, monkeypatch, tiny_tokenizer, content,
                                                           needle):
    bert = make_tiny_bert(tmp_path / "bert", tiny_tokenizer)
    data = tmp_path / "reviews.tsv"
    data.write_text(content)
    args = ["cache-teacher", "--teacher", bert, "--task", "text", "--data", data, "--text-column", "sentence",
            "--label-column", "label", "--out", tmp_path / "c", "--no-progress"]
    _one_error_line(*run_cli(args, capsys, monkeypatch)[::2], str(data), needle)
    assert not (tmp_path / "c").exists()


def test_an_empty_glue_split_file_is_refused_by_cache_teacher(tmp_path, capsys, monkeypatch, tiny_tokenizer):
    bert = make_tiny_bert(tmp_path / "bert", tiny_tokenizer)
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("")
    args = ["cache-teacher", "--teacher", bert, "--task", "sst2", "--data", tmp_path / "SST-2", "--out",
            tmp_path / "c", "--no-progress"]
    _one_error_line(*run_cli(args, capsys, monkeypatch)[::2], "train.tsv", "empty")
    assert not (tmp_path / "c").exists()


def test_a_dataset_with_one_extra_row_is_refused_by_distill_and_verify(tmp_path, capsys, monkeypatch, text_cache,
                                                                      sst2_copy, bert_student_config):  # noqa: F811
    cache, teacher = text_cache
    grown = tmp_path / "SST-2"
    shutil.copytree(sst2_copy, grown)
    with open(grown / "train.tsv", "a", encoding="utf-8") as f:
        f.write("one more good film\t1\n")
    args = ["distill", "--cache", cache, "--student", bert_student_config, "--data", grown, "--epochs", "1",
            "--out", tmp_path / "r", "--no-progress"]
    _one_error_line(*run_cli(args, capsys, monkeypatch)[::2], "train.tsv", "61 rows", "60")
    code, lines, _ = _verify([cache, "--teacher", teacher, "--data", grown, "--device", "cpu"], capsys, monkeypatch)
    assert code == 1 and [line.split(":")[0] for line in _failed(lines)] == ["FAIL  train/sample"], lines
    assert "61 rows" in _failed(lines)[0]


# --- kdcache verify ----------------------------------------------------------------------------------------------

def test_verify_passes_a_good_cache(digits_cache, capsys, monkeypatch):
    code, lines, err = _verify([digits_cache], capsys, monkeypatch)
    assert code == 0 and err == "", err
    assert not _failed(lines) and lines[-1].startswith("verdict: ok")
    assert "ok    train/checksums: all 24 chunks match their CRC32C and their place in the manifest" in lines
    code, out, _ = run_cli(["verify", digits_cache, "--json"], capsys, monkeypatch)
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and all(c["ok"] for c in report["checks"])
    names = [c["name"] for c in report["checks"]]
    assert names[:2] == ["format", "complete"] and len(names) == len(lines) - 1
    for split in ("train", "validation"):
        for check in ("structure", "chunk files", "checksums", "digest", "logits finite", "labels"):
            assert f"{split}/{check}" in names, names


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("array", ARRAYS)
def test_verify_finds_every_damaged_chunk(tmp_path, capsys, monkeypatch, digits_cache, array, how):
    copy = _copy(digits_cache, tmp_path)
    bad = _chunk_file(copy, "validation", array, 1)
    _damage(bad, how)
    code, lines, err = _verify([copy], capsys, monkeypatch)
    assert code == 1 and err == "" and lines[-1].startswith("verdict: FAIL"), lines
    failed = _failed(lines)
    check = "chunk files" if how == "delete" else "checksums"
    named = [line for line in failed if line.startswith(f"FAIL  validation/{check}")]
    assert named and f"array '{array}', chunk 1 (rows 256:360)" in named[0] and str(bad) in named[0], failed
    assert not [line for line in failed if line.startswith("FAIL  train/")]
    report = verify_cache(copy)  # the library call behind the command says the same
    assert not report.ok and report.verdict() == lines[-1]


def test_verify_checks_digest_finiteness_and_labels_behind_valid_checksums(tmp_path, digits_cache):
    """Values rewritten through Zarr carry valid checksums; the digest, the finiteness and the label checks remain."""
    copy = _copy(digits_cache, tmp_path)
    split = zarr.open_group(str(copy), mode="r+")["train"]
    split["fingerprint"][700] = np.uint64(12345)
    split["logits"][900, 3] = np.nan
    split["labels"][100] = 10
    refresh_manifest(copy)
    report = verify_cache(copy)
    failed = {c.name: c.detail for c in report.checks if not c.ok}
    assert set(failed) == {"train/digest", "train/logits finite", "train/labels"}, failed
    assert "array 'logits' row 900" in failed["train/logits finite"] and "first row 100 (label 10)" in failed["train/labels"]


def test_verify_with_its_own_teacher_passes_and_reports_the_largest_difference(digits_cache, weights, capsys,
                                                                               monkeypatch):
    code, lines, err = _verify([digits_cache, "--teacher", TEACHER, "--trust-model-code", "--weights", weights[0], "--device", "cpu"],
                               capsys, monkeypatch)
    assert code == 0, (lines, err)
    assert any(line.startswith("ok    teacher: weights sha256") for line in lines)
    logits = [line for line in lines if "/teacher logits" in line]
    assert len(logits) == 2 and all("largest |difference|" in line and "over 256 recomputed rows" in line
                                    for line in logits), logits
    largest = float(logits[0].split("largest |difference| ")[1].split()[0])
    assert 0 < largest < 2**-10 * 8 + 1e-3  # float16 rounding of logits of a few units, never zero


def test_verify_with_a_different_teacher_fails(digits_cache, weights, capsys, monkeypatch):
    code, lines, err = _verify([digits_cache, "--teacher", TEACHER, "--trust-model-code", "--weights", weights[1], "--device", "cpu"],
                               capsys, monkeypatch)
    assert code == 1 and err == "", err
    failed = [line.split(":")[0] for line in _failed(lines)]
    assert failed == ["FAIL  teacher", "FAIL  train/teacher logits", "FAIL  validation/teacher logits"], lines
    assert "not the teacher that wrote this cache" in _failed(lines)[0]
    assert lines[-1].startswith("verdict: FAIL, 3 of")


def test_verify_with_the_teacher_catches_a_rewritten_logit_that_checksums_cannot(tmp_path, digits_cache, weights):
    copy = _copy(digits_cache, tmp_path)
    logits = zarr.open_group(str(copy), mode="r+")["train"]["logits"]
    logits[1000, 4] = logits[1000, 4] + np.float16(0.05)  # a small error, checksummed as if it were right
    refresh_manifest(copy)  # and the chunk manifest rewritten to match: only the teacher can tell
    assert verify_cache(copy).ok
    report = verify_cache(copy, teacher=TEACHER, weights=weights[0], sample=2000, device="cpu",
                          trust_model_code=True)
    failed = {c.name: c.detail for c in report.checks if not c.ok}
    assert list(failed) == ["train/teacher logits"], failed
    detail = failed["train/teacher logits"]
    assert "(row 1000, output 4)" in detail and "1 row(s) beyond it" in detail


def test_verify_a_text_cache_with_its_teacher_rereads_the_data_with_the_stored_tokenizer(text_cache, capsys,
                                                                                        monkeypatch):
    cache, teacher = text_cache
    code, lines, err = _verify([cache, "--teacher", teacher, "--sample", "20", "--device", "cpu"], capsys, monkeypatch)
    assert code == 0, (lines, err)
    assert any(line.startswith("ok    tokenizer:") for line in lines)
    assert any(line.startswith("ok    train/sample fingerprints: 20 random rows") for line in lines)


def test_tolerance_is_float16_rounding_and_widens_for_autocast():
    assert tolerance("float16") == (2**-10, 1e-3)
    assert tolerance("float32")[0] < tolerance("float16")[0]
    assert tolerance("float32", "bf16")[0] > tolerance("float16")[0]


def test_verify_refuses_what_it_cannot_verify_in_one_line(tmp_path, capsys, monkeypatch, digits_cache):
    _one_error_line(*_verify([tmp_path / "absent"], capsys, monkeypatch)[::2], "no such cache")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    _one_error_line(*_verify([tmp_path / "plain.zarr"], capsys, monkeypatch)[::2], "not a kdcache cache")
    _one_error_line(*_verify([digits_cache, "--teacher", tmp_path / "no-teacher"], capsys, monkeypatch)[::2],
                    "no such teacher folder")
    _one_error_line(*_verify([digits_cache, "--teacher", TEACHER, "--trust-model-code", "--weights", tmp_path / "no.pt"],
                             capsys, monkeypatch)[::2], "no such weights file")


def test_verify_reports_an_incomplete_cache(tmp_path, capsys, monkeypatch, digits_cache):
    copy = _copy(digits_cache, tmp_path)
    _edit_json(copy / "validation" / "zarr.json", lambda meta: meta["attributes"].__setitem__("complete", False))
    code, lines, _ = _verify([copy], capsys, monkeypatch)
    assert code == 1 and [line.split(":")[0] for line in _failed(lines)] == ["FAIL  complete"], lines
    assert "split 'validation' is incomplete" in _failed(lines)[0]


# --- many readers ------------------------------------------------------------------------------------------------

def _snapshot(path: Path) -> dict[str, tuple]:
    """Every file and folder under `path`: bytes, size and modification time (folders: mtime, which changes when
    anything is created or deleted in them)."""
    snap = {}
    for p in sorted([path, *path.rglob("*")]):
        st = p.stat()
        snap[str(p.relative_to(path))] = (p.read_bytes() if p.is_file() else None, st.st_size, st.st_mtime_ns)
    return snap


def test_eight_processes_read_one_cache_at_once_with_identical_results_and_leave_it_untouched(digits_cache):
    before = _snapshot(digits_cache)
    # A forkserver imports torch and kdcache once; each reader is a fresh process forked from it (not from pytest),
    # which then imports the small concurrent_reader module itself (Python 3.11's forkserver ignores sys.path).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["kdcache.train.batches", "kdcache.recipes.verify", "concurrent_reader"])
    from concurrent_reader import read_everything

    barrier, results = ctx.Barrier(8), ctx.Queue()
    readers = [ctx.Process(target=read_everything, args=(str(digits_cache), barrier, results)) for _ in range(8)]
    for p in readers:
        p.start()
    outcomes = [results.get(timeout=180) for _ in readers]
    for p in readers:
        p.join(timeout=60)
    assert [p.exitcode for p in readers] == [0] * 8
    assert all(o[0] != "error" for o in outcomes), outcomes
    assert len({o[0] for o in outcomes}) == 1  # every reader saw the very same batches
    assert all(o[1] is True and o[2] is True for o in outcomes)  # verify passed; store opened read-only
    assert _snapshot(digits_cache) == before  # no byte, size, mtime or file changed, none added


# --- docs ----------------------------------------------------------------------------------------------------------

def test_every_test_named_in_reliability_md_exists():
    """docs/reliability.md proves each promise with a test: each named test must exist, so the page cannot rot."""
    doc = (REPO / "docs" / "reliability.md").read_text()
    named = re.findall(r"((?:\w+/)*test_\w+)\.py::(test_\w+)", doc)
    assert len(named) > 20
    for module, test in named:
        source = (REPO / "tests" / f"{module.removeprefix('tests/')}.py").read_text()
        assert re.search(rf"^def {test}\(", source, re.M), f"{module}.py::{test}"


def test_cli_doc_names_every_verify_flag():
    import typer

    from kdcache.cli.main import app

    doc = (REPO / "docs" / "cli.md").read_text()
    section = doc.split("## `kdcache verify", 1)[1].split("\n## ", 1)[0]
    for param in typer.main.get_command(app).commands["verify"].params:
        names = [o for o in param.opts if o.startswith("--")]
        assert param.name.upper() in section if not names else any(f"`{n}" in section for n in names), param.name
