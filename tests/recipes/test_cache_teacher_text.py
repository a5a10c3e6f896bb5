"""cache-teacher on real GLUE slices with a tiny BERT teacher: the stored logits are the teacher's own."""

from __future__ import annotations

import csv
import io
import zipfile

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import kdcache
from kdcache.data import DataOptions
from kdcache.fingerprint import dataset_digest, fingerprint_tokens
from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
from kdcache.models.teachers import weights_sha256
from teachers_for_tests import make_tiny_bert

LIMIT = 48


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tiny_tokenizer):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), tiny_tokenizer)


def _read_tsv(path, header=True):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def _direct_logits(bert_dir, texts, pairs=None):
    """An independent forward pass: fresh model, fresh tokenizer, one row at a time, no padding."""
    model = AutoModelForSequenceClassification.from_pretrained(str(bert_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(bert_dir))
    out, fps = [], []
    for i, text in enumerate(texts):
        enc = tok(text, pairs[i] if pairs else None, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            out.append(model(**enc).logits[0].numpy())
        fps.append(fingerprint_tokens(enc["input_ids"][0].tolist()))
    return np.stack(out), np.array(fps, dtype=np.uint64)


def _cache(bert_dir, task, folder, out, splits=("train", "validation"), **kw):
    cfg = CacheTeacherConfig(teacher=str(bert_dir), task=task, data=str(folder), out=out, splits=splits,
                             batch_size=16, device="cpu", progress=False,
                             data_options=DataOptions(limit=LIMIT), **kw)
    return kdcache.open_cache(cache_teacher(cfg), split=splits[0])


@pytest.mark.parametrize("task,folder,header,text_cols,label_col", [
    ("sst2", "SST-2", True, (0,), 1),
    ("cola", "CoLA", False, (3,), 1),
    ("mrpc", "MRPC", True, (3, 4), 0),
])
def test_cached_logits_equal_a_direct_forward_pass(tmp_path, bert_dir, glue_dir, task, folder, header, text_cols,
                                                   label_col):
    cache = _cache(bert_dir, task, glue_dir / folder, tmp_path / "c.kdcache")
    rows = _read_tsv(glue_dir / folder / "train.tsv", header)[:LIMIT]
    texts = [r[text_cols[0]] for r in rows]
    pairs = [r[text_cols[1]] for r in rows] if len(text_cols) == 2 else None
    direct, fps = _direct_logits(bert_dir, texts, pairs)
    stored = cache.logits[:].astype(np.float32)
    np.testing.assert_allclose(stored, direct, rtol=2**-10, atol=1e-4)  # float16 rounding
    np.testing.assert_array_equal(cache.labels[:], [int(r[label_col]) for r in rows])
    np.testing.assert_array_equal(cache.index[:], np.arange(LIMIT))
    np.testing.assert_array_equal(cache.fingerprint[:], fps)
    assert cache.split_attrs["dataset"]["digest"] == dataset_digest(fps)
    assert len(kdcache.open_cache(cache.path, split="validation")) == LIMIT


def test_cache_attributes_describe_teacher_data_and_software(tmp_path, bert_dir, glue_dir):
    cache = _cache(bert_dir, "sst2", glue_dir / "SST-2", tmp_path / "c.kdcache", dtype="float32")
    attrs = cache.attrs
    model = AutoModelForSequenceClassification.from_pretrained(str(bert_dir))
    assert attrs["format"] == "kdcache.teacher-cache" and attrs["format_version"] == 1 and attrs["complete"] is True
    assert attrs["teacher"]["sha256"] == weights_sha256(model)
    assert attrs["teacher"]["num_outputs"] == 2 and attrs["teacher"]["source"] == "huggingface"
    assert attrs["task"] == {"name": "sst2", "kind": "classification", "modality": "text",
                             "label_names": ["negative", "positive"]}
    assert attrs["storage"]["logits_dtype"] == "float32" and cache.logits.dtype == np.float32
    assert set(attrs["software"]) >= {"kdcache", "torch", "transformers", "zarr", "numcodecs"}
    assert attrs["splits"] == ["train", "validation"]
    dataset = cache.split_attrs["dataset"]
    assert dataset["n"] == LIMIT and dataset["source"].endswith("SST-2/train.tsv") and dataset["split"] == "train"


def test_cache_embeds_the_tokenizer_so_fingerprints_can_be_rederived(tmp_path, bert_dir, glue_dir):
    cache = _cache(bert_dir, "sst2", glue_dir / "SST-2", tmp_path / "c.kdcache")
    import zarr

    blob = bytes(zarr.open_group(str(cache.path), mode="r")["tokenizer"][:])
    target = tmp_path / "tok"
    zipfile.ZipFile(io.BytesIO(blob)).extractall(target)
    tok = AutoTokenizer.from_pretrained(str(target))
    first = _read_tsv(glue_dir / "SST-2" / "train.tsv")[0][0]
    assert fingerprint_tokens(tok(first, truncation=True, max_length=128)["input_ids"]) == int(cache.fingerprint[0])


def test_fingerprint_changes_when_one_token_changes(tmp_path, bert_dir, glue_dir):
    src = (glue_dir / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[: LIMIT + 1]
    edited = list(src)
    sentence, label = edited[5].rsplit("\t", 1)
    words = sentence.split()
    words[0] = "film" if words[0] != "film" else "movie"
    edited[5] = " ".join(words) + "\t" + label
    for name, lines in (("a", src), ("b", edited)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    a = _cache(bert_dir, "sst2", tmp_path / "a", tmp_path / "a.kdcache", splits=("train",))
    b = _cache(bert_dir, "sst2", tmp_path / "b", tmp_path / "b.kdcache", splits=("train",))
    differ = np.flatnonzero(a.fingerprint[:] != b.fingerprint[:])
    assert differ.tolist() == [4]  # data row 4 is file line 5
    assert a.split_attrs["dataset"]["digest"] != b.split_attrs["dataset"]["digest"]
