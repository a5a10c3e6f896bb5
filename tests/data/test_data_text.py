"""Text loaders on real GLUE files and on files written here in GLUE's published layouts and in tsv/csv/jsonl."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from kdcache.data.base import MISSING_CLASS
from kdcache.data.text import load_text_split
from kdcache.errors import KDCacheError
from kdcache.fingerprint import fingerprint_tokens


def _read_tsv(path, header=True):
    """An independent reader: GLUE TSVs, quoting off, BOM dropped."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def _ids(split):
    return [split.dataset[i]["inputs"]["input_ids"] for i in range(len(split))]


def _labels(split):
    return [split.dataset[i]["label"] for i in range(len(split))]


def _write_tsv(path, rows):
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- real GLUE files

@pytest.mark.parametrize("split,file", [("train", "train.tsv"), ("validation", "dev.tsv")])
def test_sst2_real_slice(glue_dir, tiny_tokenizer, split, file):
    data = load_text_split("sst2", glue_dir / "SST-2", split, tiny_tokenizer, limit=50)
    rows = _read_tsv(glue_dir / "SST-2" / file)[:50]
    assert len(data) == 50 and data.kind == "classification" and data.modality == "text"
    assert data.label_names == ["negative", "positive"] and data.num_labels == 2
    assert _labels(data) == [int(r[1]) for r in rows]
    assert [data.dataset[i]["index"] for i in range(50)] == list(range(50))
    assert _ids(data) == [tiny_tokenizer(r[0], truncation=True, max_length=128)["input_ids"] for r in rows]
    assert data.source.endswith(f"SST-2/{file}") and data.preprocess["file"] == file
    item = data.dataset[7]
    assert item["fingerprint"] == fingerprint_tokens(item["inputs"]["input_ids"])
    json.dumps(data.preprocess)


def test_cola_real_slice_has_no_header_and_reads_the_fourth_column(glue_dir, tiny_tokenizer):
    data = load_text_split("cola", glue_dir / "CoLA", "train", tiny_tokenizer, limit=50)
    rows = _read_tsv(glue_dir / "CoLA" / "train.tsv", header=False)[:50]  # the first line is a data row
    assert len(rows[0]) == 4 and len(data) == 50
    assert _labels(data) == [int(r[1]) for r in rows]
    assert _ids(data) == [tiny_tokenizer(r[3], truncation=True, max_length=128)["input_ids"] for r in rows]
    assert data.label_names == ["unacceptable", "acceptable"]
    assert [data.dataset[i]["index"] for i in range(50)] == list(range(50))


@pytest.mark.parametrize("split,file", [("train", "train.tsv"), ("validation", "dev.tsv")])
def test_mrpc_real_slice_is_sentence_pairs(glue_dir, tiny_tokenizer, split, file):
    data = load_text_split("mrpc", glue_dir / "MRPC", split, tiny_tokenizer, limit=40)
    rows = _read_tsv(glue_dir / "MRPC" / file)[:40]
    assert len(data) == 40 and _labels(data) == [int(r[0]) for r in rows]
    assert data.label_names == ["not_equivalent", "equivalent"]
    for i, r in enumerate(rows):
        item = data.dataset[i]
        ids = item["inputs"]["input_ids"]
        assert ids.count(tiny_tokenizer.sep_token_id) == 2
        assert ids == tiny_tokenizer(r[3], r[4], truncation=True, max_length=128)["input_ids"]
        assert 1 in item["inputs"]["token_type_ids"] and item["index"] == i
    assert data.preprocess["text_column"] == "#1 String" and data.preprocess["text_pair_column"] == "#2 String"


@pytest.mark.parametrize("task,folder,n,counts", [
    ("sst2", "SST-2", 872, {0: 428, 1: 444}),
    ("cola", "CoLA", 1043, {0: 322, 1: 721}),
    ("mrpc", "MRPC", 408, {0: 129, 1: 279}),
])
def test_full_dev_files(shared_data, tiny_tokenizer, task, folder, n, counts):
    data = load_text_split(task, shared_data / "glue" / folder, "validation", tiny_tokenizer)
    assert len(data) == n
    labels = np.array(_labels(data))
    assert {k: int((labels == k).sum()) for k in counts} == counts


@pytest.mark.parametrize("task,folder,header,label_col,n", [("sst2", "SST-2", True, 1, 640),
                                                            ("cola", "CoLA", False, 1, 200), ("mrpc", "MRPC", True, 0, 200)])
def test_whole_dev_slices_load_every_row(glue_dir, tiny_tokenizer, task, folder, header, label_col, n):
    """Without a limit every row of the file is read, each with its own label (the committed slices' rows)."""
    rows = _read_tsv(glue_dir / folder / "dev.tsv", header=header)
    data = load_text_split(task, glue_dir / folder, "validation", tiny_tokenizer)
    assert len(data) == len(rows) == n
    assert _labels(data) == [int(r[label_col]) for r in rows]
    assert set(_labels(data)) == {0, 1}


def test_glue_test_files_have_no_labels(glue_dir, tiny_tokenizer):
    sst = load_text_split("sst2", glue_dir / "SST-2", "test", tiny_tokenizer, limit=20)
    rows = _read_tsv(glue_dir / "SST-2" / "test.tsv")[:20]
    assert _labels(sst) == [MISSING_CLASS] * 20
    assert _ids(sst) == [tiny_tokenizer(r[1], truncation=True, max_length=128)["input_ids"] for r in rows]
    cola = load_text_split("cola", glue_dir / "CoLA", "test", tiny_tokenizer, limit=5)  # this one has a header
    first = _read_tsv(glue_dir / "CoLA" / "test.tsv")[0]
    assert cola.dataset[0]["inputs"]["input_ids"] == tiny_tokenizer(first[1])["input_ids"]
    assert cola.collate([cola.dataset[i] for i in range(5)]).labels.tolist() == [MISSING_CLASS] * 5


def test_glue_parent_folder_and_single_file_are_accepted(glue_dir, tiny_tokenizer):
    a = load_text_split("sst2", glue_dir, "validation", tiny_tokenizer, limit=5)
    b = load_text_split("sst2", glue_dir / "SST-2" / "dev.tsv", "validation", tiny_tokenizer, limit=5)
    assert a.source == b.source and _ids(a) == _ids(b)


# ---------------------------------------------------------------------------------------------- other GLUE layouts

_MNLI_HEAD = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def _mnli_row(i, s1, s2, labels):
    return [str(i), "1", f"{i}e", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)", s1, s2, *labels]


_QUOTE = '"the film was good, he said'  # a bare quote: with quoting on, this would swallow the rest of the file

_LAYOUTS = {
    "rte": ("train.tsv", "train", [["index", "sentence1", "sentence2", "label"],
                                   ["0", _QUOTE, "it was good", "entailment"],
                                   ["1", "a bad movie", "a great movie", "not_entailment"],
                                   ["2", "the story", "a story", "entailment"]], [0, 1, 0]),
    "qnli": ("dev.tsv", "validation", [["index", "question", "sentence", "label"],
                                       ["0", "who was it ?", _QUOTE, "not_entailment"],
                                       ["1", "what is it ?", "it is a film", "entailment"]], [1, 0]),
    "qqp": ("train.tsv", "train", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                                   ["0", "1", "2", "how good is it ?", _QUOTE, "1"],
                                   ["1", "3", "4", "why ?", "when ?", "0"]], [1, 0]),
    "mnli": ("train.tsv", "train", [[*_MNLI_HEAD, "label1", "gold_label"],
                                    _mnli_row(0, _QUOTE, "it was", ["neutral", "neutral"]),
                                    _mnli_row(1, "a film", "no film", ["contradiction", "contradiction"]),
                                    _mnli_row(2, "a film", "one film", ["entailment", "entailment"])], [1, 2, 0]),
    "mnli-dev": ("dev_matched.tsv", "validation", [
        [*_MNLI_HEAD, "label1", "label2", "label3", "label4", "label5", "gold_label"],
        _mnli_row(0, "a film", _QUOTE, ["neutral", "entailment", "neutral", "neutral", "contradiction", "neutral"]),
        _mnli_row(1, "a film", "no film", ["contradiction"] * 5 + ["contradiction"]),
    ], [1, 2]),
}


@pytest.mark.parametrize("name", list(_LAYOUTS))
def test_other_glue_layouts(tmp_path, tiny_tokenizer, name):
    task = name.split("-")[0]
    file, split, rows, expected = _LAYOUTS[name]
    _write_tsv(tmp_path / file, rows)
    data = load_text_split(task, tmp_path, split, tiny_tokenizer)
    header = rows[0]
    text, pair = {"rte": ("sentence1", "sentence2"), "qnli": ("question", "sentence"),
                  "qqp": ("question1", "question2"), "mnli": ("sentence1", "sentence2")}[task]
    assert len(data) == len(rows) - 1 and _labels(data) == expected
    for i, r in enumerate(rows[1:]):
        want = tiny_tokenizer(r[header.index(text)], r[header.index(pair)], truncation=True, max_length=128)
        assert data.dataset[i]["inputs"]["input_ids"] == want["input_ids"]
    quoted = [i for i, r in enumerate(rows[1:]) if _QUOTE in r][0]
    assert tiny_tokenizer.convert_tokens_to_ids('"') in data.dataset[quoted]["inputs"]["input_ids"]


def test_mnli_test_and_mismatched_files(tmp_path, tiny_tokenizer):
    _write_tsv(tmp_path / "test_matched.tsv", [_MNLI_HEAD, _mnli_row(0, "a film", "one film", [])])
    _write_tsv(tmp_path / "dev_mismatched.tsv", [[*_MNLI_HEAD, "label1", "gold_label"],
                                                  _mnli_row(0, "a", "b", ["neutral", "neutral"])])
    test = load_text_split("mnli", tmp_path, "test", tiny_tokenizer)
    assert _labels(test) == [MISSING_CLASS] and test.label_names == ["entailment", "neutral", "contradiction"]
    mism = load_text_split("mnli", tmp_path, "validation_mismatched", tiny_tokenizer)
    assert _labels(mism) == [1] and mism.source.endswith("dev_mismatched.tsv")


def test_stsb_is_regression(tmp_path, tiny_tokenizer):
    head = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    rows = [head, ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", _QUOTE, "a film", "5.000"],
            ["1", "main-news", "x", "2012", "0002", "none", "none", "the story", "no story", "0.75"]]
    _write_tsv(tmp_path / "train.tsv", rows)
    _write_tsv(tmp_path / "test.tsv", [head[:-1], rows[1][:-1]])
    data = load_text_split("stsb", tmp_path, "train", tiny_tokenizer)
    assert data.kind == "regression" and data.label_names is None and data.num_labels == 1
    assert _labels(data) == [5.0, 0.75]
    batch = data.collate([data.dataset[0], data.dataset[1]])
    assert batch.labels.dtype == torch.float32 and batch.labels.tolist() == [5.0, 0.75]
    test = load_text_split("stsb", tmp_path, "test", tiny_tokenizer)
    assert math.isnan(test.dataset[0]["label"])


# ---------------------------------------------------------------------------------------------- generic text task

def test_text_tsv_with_string_labels_and_label_names(tmp_path, tiny_tokenizer):
    _write_tsv(tmp_path / "train.tsv", [["id", "review", "sentiment"], ["a", _QUOTE, "pos"], ["b", "bad", "neg"],
                                        ["c", "good", "1"]])
    data = load_text_split("text", tmp_path, "train", tiny_tokenizer, text_column="review", label_column="sentiment",
                           label_names=["neg", "pos"])
    assert _labels(data) == [1, 0, 1] and data.label_names == ["neg", "pos"]  # "1": integer labels are ids
    assert data.dataset[0]["inputs"]["input_ids"] == tiny_tokenizer(_QUOTE)["input_ids"]
    assert data.preprocess["text_column"] == "review" and data.preprocess["label_column"] == "sentiment"


def test_text_csv_quoted_comma_and_sorted_label_names(tmp_path, tiny_tokenizer):
    with open(tmp_path / "dev.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["q", "a", "y"], ["good, very good", "yes", "pos"], ["bad", "no", "neg"],
                                 ["so so", "maybe", "mid"]])
    assert '"good, very good"' in (tmp_path / "dev.csv").read_text()
    data = load_text_split("text", tmp_path, "validation", tiny_tokenizer, text_column="q", text_pair_column="a",
                           label_column="y")
    assert data.label_names == ["mid", "neg", "pos"] and _labels(data) == [2, 1, 0]
    assert data.dataset[0]["inputs"]["input_ids"] == tiny_tokenizer("good, very good", "yes")["input_ids"]
    assert data.source.endswith("dev.csv")


def test_text_jsonl_file_integer_labels_and_unlabeled(tmp_path, tiny_tokenizer):
    path = tmp_path / "any.jsonl"
    path.write_text(json.dumps({"t": "the film", "y": 2}) + "\n\n" + json.dumps({"t": "a story", "y": 0}) + "\n",
                    encoding="utf-8")
    data = load_text_split("text", path, "test", tiny_tokenizer, text_column="t", label_column="y")
    assert _labels(data) == [2, 0] and data.label_names == ["0", "1", "2"]
    unlabeled = load_text_split("text", path, "test", tiny_tokenizer, text_column="t")
    assert _labels(unlabeled) == [MISSING_CLASS] * 2 and unlabeled.label_names is None


def test_text_regression(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text('{"t": "good", "s": 0.5}\n{"t": "bad", "s": "-1.25"}\n{"t": "so so", "s": null}\n')
    data = load_text_split("text", tmp_path, "train", tiny_tokenizer, text_column="t", label_column="s",
                           regression=True)
    labels = _labels(data)
    assert data.kind == "regression" and labels[:2] == [0.5, -1.25] and math.isnan(labels[2])


# ---------------------------------------------------------------------------------------------- fingerprints, batches

def test_fingerprints_follow_the_tokens(tmp_path, tiny_tokenizer):
    _write_tsv(tmp_path / "train.tsv", [["sentence", "label"], ["the film was good", "1"],
                                        ["the film was good", "0"], ["the film was bad", "1"]])
    data = load_text_split("sst2", tmp_path, "train", tiny_tokenizer)
    fp = [data.dataset[i]["fingerprint"] for i in range(3)]
    assert fp[0] == fp[1] and fp[0] != fp[2]
    short = load_text_split("sst2", tmp_path, "train", tiny_tokenizer, max_length=4)  # truncation changes it too
    assert short.dataset[0]["fingerprint"] != fp[0] and len(short.dataset[0]["inputs"]["input_ids"]) == 4


def test_collate_pads_and_prepare_feeds_a_model(glue_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from teachers_for_tests import make_tiny_bert

    data = load_text_split("sst2", glue_dir / "SST-2", "validation", tiny_tokenizer, limit=6)
    items = [data.dataset[i] for i in range(6)]
    batch = data.collate(items)
    lengths = [len(it["inputs"]["input_ids"]) for it in items]
    assert len(set(lengths)) > 1
    ids, mask, types = batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.inputs["token_type_ids"]
    assert ids.shape == (6, max(lengths)) and ids.dtype == torch.int64
    assert mask.sum(1).tolist() == lengths
    for r, it in enumerate(items):
        n = lengths[r]
        assert ids[r, :n].tolist() == it["inputs"]["input_ids"]
        assert types[r, :n].tolist() == it["inputs"]["token_type_ids"]
        assert (ids[r, n:] == tiny_tokenizer.pad_token_id).all() and (mask[r, n:] == 0).all()
        assert (types[r, n:] == 0).all()
    assert batch.index.tolist() == list(range(6)) and batch.labels.dtype == torch.int64
    assert batch.fingerprint.dtype == np.uint64 and batch.fingerprint.tolist() == [it["fingerprint"] for it in items]

    model = AutoModelForSequenceClassification.from_pretrained(str(make_tiny_bert(tmp_path / "bert", tiny_tokenizer)))
    inputs = data.prepare(batch, torch.device("cpu"))
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    with torch.no_grad():
        padded = model(**inputs).logits
        alone = torch.cat([model(**data.prepare(data.collate([it]), torch.device("cpu"))).logits for it in items])
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors

def _error(fn) -> str:
    with pytest.raises(KDCacheError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_errors_name_the_file_and_the_problem(tmp_path, tiny_tokenizer, glue_dir):
    tok = tiny_tokenizer

    def load(task, data, split="train", **kw):
        return lambda: load_text_split(task, data, split, tok, **kw)

    msg = _error(load("sst3", tmp_path))
    assert str(tmp_path) in msg and "sst3" in msg and "mnli" in msg and "text" in msg
    msg = _error(load("sst2", tmp_path / "nowhere"))
    assert "nowhere" in msg and "train.tsv" in msg
    msg = _error(load("sst2", tmp_path, "validation"))  # folder exists, file does not
    assert "dev.tsv" in msg and "missing" in msg
    msg = _error(load("sst2", glue_dir / "SST-2", "validation_mismatched"))
    assert "SST-2" in msg and "train, validation, dev, test" in msg
    msg = _error(load("text", tmp_path / "nowhere.tsv"))
    assert "nowhere.tsv" in msg
    msg = _error(load("text", tmp_path, "validation", text_column="t"))
    assert str(tmp_path) in msg and "dev.tsv" in msg and "validation.jsonl" in msg

    _write_tsv(tmp_path / "cols.tsv", [["sentence", "label"], ["good", "pos"]])
    msg = _error(load("text", tmp_path / "cols.tsv", text_column="text"))
    assert "cols.tsv" in msg and "'text'" in msg and "sentence, label" in msg
    msg = _error(load("text", tmp_path / "cols.tsv"))
    assert "cols.tsv" in msg and "text_column" in msg and "sentence, label" in msg
    msg = _error(load("text", tmp_path / "cols.tsv", text_column="sentence", label_column="label",
                      label_names=["neg", "other"]))
    assert "cols.tsv" in msg and "line 2" in msg and "'pos'" in msg

    (tmp_path / "empty.tsv").write_text("")
    assert "empty.tsv" in _error(load("sst2", tmp_path / "empty.tsv"))
    (tmp_path / "cola").mkdir()
    (tmp_path / "cola" / "train.tsv").write_text("\n")
    assert "train.tsv" in _error(load("cola", tmp_path / "cola"))
    (tmp_path / "head.csv").write_text("text,label\n")
    msg = _error(load("text", tmp_path / "head.csv", text_column="text"))
    assert "head.csv" in msg and "no data rows" in msg

    _write_tsv(tmp_path / "bad.tsv", [["sentence", "label"], ["good", "1"], ["a\tb", "1"]])
    msg = _error(load("sst2", tmp_path / "bad.tsv"))
    assert "bad.tsv" in msg and "line 3" in msg and "3 fields" in msg and "expected 2" in msg
    _write_tsv(tmp_path / "cola3.tsv", [["gj04", "1", "", "a film"], ["gj04", "1", "a film"]])
    msg = _error(load("cola", tmp_path / "cola3.tsv"))
    assert "cola3.tsv" in msg and "line 2" in msg and "expected 4" in msg
    _write_tsv(tmp_path / "two.tsv", [["sentence", "label"], ["good", "1"], ["bad", "2"]])
    msg = _error(load("sst2", tmp_path / "two.tsv"))
    assert "two.tsv" in msg and "line 3" in msg and "'2'" in msg
    _write_tsv(tmp_path / "rte.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entails"]])
    assert "'entails'" in _error(load("rte", tmp_path / "rte.tsv"))
    (tmp_path / "broken.jsonl").write_text('{"t": "good"}\n{"t": \n')
    msg = _error(load("text", tmp_path / "broken.jsonl", text_column="t"))
    assert "broken.jsonl" in msg and "line 2" in msg
    (tmp_path / "notes.txt").write_text("good\n")
    assert "notes.txt" in _error(load("text", tmp_path / "notes.txt", text_column="t"))
    assert "cols.tsv" in _error(load("sst2", tmp_path / "cols.tsv", text_column="sentence"))
