"""Issue 20, points 1 and 2: sparse teacher targets (format version 2) captured, stored, described and refused.

A top-k row, its ids and its log-sum-exps equal the teacher's own outputs; sampled rows hold N draws whose bytes
depend on (seed, row) alone, so an interrupted and resumed capture stores the same bytes; `info --json` names the
target kind; every bad input is one line; a version-1 reader refuses a version-2 cache; v1 caches open as dense."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kdcache
from kdcache.cache import schema
from kdcache.cache.targets import TargetSpec, default_temperatures, row_seed, sampled_arrays
from kdcache.errors import KDCacheError
from kdcache.methods.registry import METHODS
from helpers import REPO, interrupt_autocast_at, run_cli, write_tsv
from teachers_for_tests import linear_digits, make_tiny_bert

TEACHER = "teachers_for_tests:linear_digits"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "linear.pt"
    torch.save(linear_digits().state_dict(), path)
    return path


def _args(weights, out, *extra):
    return ["cache-teacher", "--teacher", TEACHER, "--weights", weights, "--task", "digits", "--split", "train",
            "--out", out, "--device", "cpu", "--no-progress", "--trust-model-code", *extra]


def _teacher_logits(weights) -> torch.Tensor:
    """The teacher's own outputs on every train row, recomputed here in one pass (digits rows in their order)."""
    model = linear_digits()
    model.load_state_dict(torch.load(weights))
    from kdcache.data import load_split

    split = load_split("digits", None, "train")
    inputs = split.prepare(split.collate([split.dataset[i] for i in range(len(split))]), torch.device("cpu"))
    with torch.no_grad():
        return model(inputs).float()


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, weights):
    out = tmp_path_factory.mktemp("topk") / "c.kdcache"
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher

    cache_teacher(CacheTeacherConfig(teacher=TEACHER, weights=str(weights), task="digits", out=out, device="cpu",
                                     progress=False, trust_model_code=True, dtype="float32", topk=4,
                                     lse_temperatures=(1.0, 2.0, 4.0)))
    return out


def test_a_cached_topk_row_its_ids_and_its_logsumexp_equal_the_teachers_own_outputs(topk_cache, weights):
    cache = kdcache.open_cache(topk_cache, "train")
    z = _teacher_logits(weights)
    values, ids = torch.topk(z, 4, dim=1)
    assert cache.target.kind == "topk" and cache.target.temperatures == [1.0, 2.0, 4.0]
    assert cache.header.format_version == 2 and cache.num_outputs == 10
    np.testing.assert_allclose(cache.read("topk_values"), values.numpy(), rtol=1e-6, atol=1e-6)
    assert np.array_equal(cache.read("topk_indices").astype(np.int64), ids.numpy())
    assert cache.read("topk_indices").dtype == np.uint8 and cache.read("logsumexp").dtype == np.float32
    lse = torch.stack([torch.logsumexp(z / t, dim=1) for t in (1.0, 2.0, 4.0)], dim=1)
    np.testing.assert_allclose(cache.read("logsumexp"), lse.numpy(), rtol=1e-6, atol=1e-6)
    quality = cache.target_quality
    assert quality["rows_measured"] == 1024 and 0 < quality["kept_mass"] < 1 and quality["kl"] > 0
    # the kept mass recorded is the teacher's own, on the split's first 1,024 rows
    kept = torch.softmax(z[:1024].double(), 1).gather(1, ids[:1024]).sum(1).mean()
    assert abs(quality["kept_mass"] - float(kept)) < 1e-5
    with pytest.raises(KDCacheError, match="has no array 'logits'"):
        cache.read("logits")


def test_info_json_names_the_target_kind_and_its_quality(topk_cache, capsys, monkeypatch):
    code, out, err = run_cli(["info", topk_cache, "--json"], capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["format_version"] == 2 and summary["target"]["kind"] == "topk" and summary["target"]["k"] == 4
    assert summary["target"]["temperatures"] == [1.0, 2.0, 4.0]
    split = summary["splits"][0]
    assert set(split["target_arrays"]) == {"topk_values", "topk_indices", "logsumexp"}
    assert split["target_quality"]["kept_mass"] > 0 and split["bytes_per_sample"] > 0
    code, out, _ = run_cli(["info", topk_cache], capsys, monkeypatch)
    assert code == 0 and "top-4 of 10 (logsumexp at T = 1, 2, 4)" in out and "kept mass" in out


def test_a_dense_cache_stays_format_version_1_and_names_its_kind(tmp_path, weights, capsys, monkeypatch):
    out = tmp_path / "c.kdcache"
    assert run_cli(_args(weights, out), capsys, monkeypatch)[0] == 0
    cache = kdcache.open_cache(out, "train")
    assert cache.header.format_version == 1 and cache.target.kind == "dense" and cache.names[0] == "logits"
    code, text, _ = run_cli(["info", out, "--json"], capsys, monkeypatch)
    assert json.loads(text)["target"]["kind"] == "dense"


def test_the_committed_v1_fixture_opens_as_dense():
    for folder in sorted((REPO / "tests" / "fixtures" / "v1").glob("*.kdcache")):
        cache = kdcache.open_cache(folder, kdcache.Cache(folder).splits[0])
        assert cache.target.kind == "dense" and cache.target.arrays == ["logits"], folder
        assert cache.num_outputs == cache.read("logits").shape[1]


def test_topk_not_below_the_outputs_stores_dense_logits_and_says_so(tmp_path, weights, capsys, monkeypatch):
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(_args(weights, out, "--topk", "10"), capsys, monkeypatch)
    assert code == 0 and "--topk 10 is not below the teacher's 10 outputs: storing dense logits" in err, err
    cache = kdcache.open_cache(out, "train")
    assert cache.target.kind == "dense" and cache.header.format_version == 1


def test_sampled_rows_hold_n_draws_whose_bytes_depend_on_seed_and_row_alone(tmp_path, weights, capsys, monkeypatch):
    out = tmp_path / "c.kdcache"
    assert run_cli(_args(weights, out, "--sample-tokens", "50", "--sample-seed", "7"), capsys, monkeypatch)[0] == 0
    cache = kdcache.open_cache(out, "train")
    ids, counts, logprobs = (cache.read(a) for a in ("sampled_ids", "sampled_counts", "sampled_logprobs"))
    assert cache.target.kind == "sampled" and cache.target.width == 10 and cache.target.seed == 7
    assert (counts.sum(axis=1) == 50).all() and counts.dtype == np.uint8 and ids.dtype == np.uint8
    z = _teacher_logits(weights)
    used = counts > 0
    np.testing.assert_allclose(logprobs[used], torch.log_softmax(z, 1).gather(1, torch.from_numpy(
        ids.astype(np.int64))).numpy()[used], rtol=1e-5, atol=1e-6)
    assert (logprobs[~used] == 0).all() and (ids[~used] == 0).all()
    # one row alone, at its position, in another batch: the very same draw
    again = sampled_arrays(z[100:103], 50, 1.0, 7, first_row=100)
    assert np.array_equal(again["sampled_ids"].numpy(), ids[100:103].astype(np.int64))
    assert np.array_equal(again["sampled_counts"].numpy(), counts[100:103].astype(np.int64))
    assert row_seed(7, 100) != row_seed(7, 101) and row_seed(7, 100) != row_seed(8, 100)


@pytest.mark.parametrize("kind", [("--topk", "3"), ("--sample-tokens", "20")])
def test_an_interrupted_sparse_capture_resumes_to_the_same_bytes(tmp_path, weights, capsys, monkeypatch, kind):
    reference, out = tmp_path / "ref.kdcache", tmp_path / "c.kdcache"
    flags = ("--chunk-rows", "256", "--batch-size", "48", *kind)
    assert run_cli(_args(weights, reference, *flags), capsys, monkeypatch)[0] == 0
    interrupt_autocast_at(monkeypatch, 13)  # batch 12: rows 528-575, after chunks 0 and 1 were stored
    code, _, err = run_cli(_args(weights, out, *flags), capsys, monkeypatch)
    assert code == 130 and "rows 0-511 are stored" in err, err
    monkeypatch.undo()
    code, _, err = run_cli(_args(weights, out, *flags), capsys, monkeypatch)
    assert code == 0 and "resuming split 'train' at row 512" in err, err
    ref, got = kdcache.open_cache(reference, "train"), kdcache.open_cache(out, "train")
    assert got.names == ref.names and got.target.kind != "dense"
    for name in got.names:
        assert np.array_equal(got.read(name), ref.read(name)), name
    assert got.chunk_digests == ref.chunk_digests


def test_resuming_with_another_target_is_refused(tmp_path, weights, capsys, monkeypatch):
    out = tmp_path / "c.kdcache"
    interrupt_autocast_at(monkeypatch, 13)
    flags = ("--chunk-rows", "256", "--batch-size", "48")
    assert run_cli(_args(weights, out, *flags, "--topk", "3"), capsys, monkeypatch)[0] == 130
    monkeypatch.undo()
    code, _, err = run_cli(_args(weights, out, *flags, "--topk", "4"), capsys, monkeypatch)
    assert code == 1 and "written with other settings (differs in target" in err, err


# --- bad input: one line each -----------------------------------------------------------------------------------

def _one_line(code, err, *needles):
    lines = [line for line in err.strip().splitlines() if not line.startswith("kdcache: ")]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("flags, needle", [
    (("--topk", "0"), "--topk must be at least 1, got 0"),
    (("--topk", "-3"), "--topk must be at least 1, got -3"),
    (("--topk", "12", "--no-dense-fallback"), "--topk 12 keeps every one of the teacher's 10 outputs"),
    (("--topk", "3", "--sample-tokens", "5"), "--topk and --sample-tokens are two target kinds"),
    (("--sample-tokens", "0"), "--sample-tokens must be at least 1"),
    (("--sample-tokens", "5", "--sample-temperature", "0"), "--sample-temperature must be positive"),
    (("--sample-tokens", "5", "--sample-temperature", "inf"), "--sample-temperature must be positive and finite"),
    (("--sample-tokens", "5", "--sample-temperature", "nan"), "--sample-temperature must be positive and finite"),
    (("--sample-tokens", "5", "--sample-seed", "-1"), "--sample-seed must be 0 or more"),
    (("--lse-temperatures", "1,2"), "--lse-temperatures needs --topk K"),
    (("--topk", "3", "--lse-temperatures", "1,x"), "--lse-temperatures '1,x': 'x' is not a number"),
    (("--topk", "3", "--lse-temperatures", "2,-1"), "temperatures must be positive"),
])
def test_bad_target_flags_are_one_line(tmp_path, weights, capsys, monkeypatch, flags, needle):
    out = tmp_path / "c.kdcache"
    _one_line(*run_cli(_args(weights, out, *flags), capsys, monkeypatch)[::2], needle)
    assert not (out / "zarr.json").exists()


def test_sample_tokens_on_a_regression_task_is_one_line(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    bert = make_tiny_bert(tmp_path / "bert1", tiny_tokenizer, num_labels=1, seed=1)
    head = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    folder = write_tsv(tmp_path / "STS-B" / "train.tsv",
                            [head, ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "a film",
                                    "the film", "4.250"]]).parent
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", bert, "--task", "stsb", "--data", folder, "--out", out,
                            "--no-progress", "--device", "cpu", "--sample-tokens", "8"], capsys, monkeypatch)
    _one_line(code, err, "--sample-tokens draws classes", "task 'stsb' is regression")
    assert not (out / "zarr.json").exists()


def test_a_version_1_reader_refuses_a_version_2_cache(topk_cache, monkeypatch):
    monkeypatch.setattr(schema, "FORMAT_VERSION", 1)  # this kdcache as a version-1 reader
    with pytest.raises(KDCacheError, match=r"cache format version 2 is newer than this kdcache reads \(1\); "
                                           "upgrade kdcache"):
        kdcache.open_cache(topk_cache, "train")


def test_an_edited_target_attribute_is_one_line(topk_cache, tmp_path):
    import shutil

    copy = tmp_path / "c.kdcache"
    shutil.copytree(topk_cache, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["target"]["kind"] = "topq"
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(KDCacheError, match="attribute target.kind is 'topq', not one of dense, topk, sampled"):
        kdcache.open_cache(copy, "train")
    meta["attributes"]["target"]["kind"] = "topk"
    meta["attributes"]["format_version"] = 1
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(KDCacheError, match="a topk target needs format_version 2, but the cache says 1"):
        kdcache.open_cache(copy, "train")


def test_default_temperatures_make_every_presets_schedule_exact():
    temps = default_temperatures({name: cls.defaults for name, cls in METHODS.items()})
    assert temps[0] == 1.0 and temps == [float(t) for t in range(1, 21)]  # T_max 20 (cifar), 10 (glue); vanilla 4
    spec = TargetSpec.topk(1000, 32, "float16", temps)
    assert spec.dtypes == {"topk_values": "float16", "topk_indices": "uint16", "logsumexp": "float32"}
    assert spec.row_bytes == 32 * 2 + 32 * 2 + 20 * 4


def test_info_names_a_few_labels_and_counts_the_rest(topk_cache, capsys, monkeypatch):
    from cli.main import _labels

    code, out, _ = run_cli(["info", topk_cache], capsys, monkeypatch)
    assert code == 0 and "labels: 0, 1, 2, 3, 4, 5, 6, 7, ... (10 labels)" in out, out
    names = [f"class_{i}" for i in range(1000)]
    assert _labels(names) == "class_0, class_1, class_2, class_3, class_4, class_5, class_6, class_7, ... (1000 labels)"
    assert _labels(["a", "b"]) == "a, b" and _labels(None) == "-"
