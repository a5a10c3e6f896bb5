"""Text data sources: the GLUE tasks in their published TSV layouts, and any tsv/csv/jsonl file with named columns.

Row i of a split is the i-th data row of the file read (the header and empty lines are not rows). Rows are
tokenised when they are read, a batch per tokenizer call (in the DataLoader's workers), without padding, so a
split of MNLI's size loads in one pass over its file; only the rows kept exist: the first `limit`, or the `subset`
spread evenly over the split; with `limit` the file is parsed only up to that row, unless the class names come from the labels
themselves (then every row is read, so the class set does not depend on the limit). Each row's fingerprint
hashes exactly its unpadded token ids. Batches are right-padded to their longest row.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from kdcache.data.base import (LABEL_IDS, MISSING_CLASS, SUBSET_RULE, Batch, SplitData, evenly_spaced_rows,
                                split_file)
from kdcache.errors import KDCacheError, SplitMissing
from kdcache.fingerprint import fingerprint_tokens

#: `dev` names the dev file too: with --holdout, `validation` is rows held out of train, and dev stays reportable
#: (`--report-split dev`) without ever selecting a checkpoint (benchmarks/reproduce.py's GLUE protocol).
_GLUE_FILES = {"train": "train.tsv", "validation": "dev.tsv", "dev": "dev.tsv", "test": "test.tsv"}
_MNLI_FILES = {
    "train": "train.tsv",
    "validation": "dev_matched.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
    "dev": "dev_matched.tsv",
    "test": "test_matched.tsv",
    "test_matched": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_NLI3 = ("entailment", "neutral", "contradiction")


@dataclass(frozen=True)
class GluePreset:
    """How one GLUE task lays out its files, so users name only the task and the folder."""

    folder: str  # the task's folder inside GLUE's download (also accepted as a subfolder of --data)
    files: dict[str, str]  # split -> file name
    text: str
    pair: str | None
    label: str
    label_names: tuple[str, ...] | None  # None: regression (float label)
    label_values: tuple[str, ...] | None  # the file's spelling of class id 0, 1, ...
    headerless: tuple[str, ...] = ()  # splits whose files have no header row ...
    columns: tuple[str, ...] = ()  # ... and the names given to their columns, by position


GLUE_PRESETS: dict[str, GluePreset] = {
    "sst2": GluePreset("SST-2", _GLUE_FILES, "sentence", None, "label", ("negative", "positive"), _BINARY),
    "cola": GluePreset("CoLA", _GLUE_FILES, "sentence", None, "label", ("unacceptable", "acceptable"), _BINARY,
                       headerless=("train", "validation"),
                       columns=("source", "label", "original_mark", "sentence")),
    "mrpc": GluePreset("MRPC", _GLUE_FILES, "#1 String", "#2 String", "Quality",
                       ("not_equivalent", "equivalent"), _BINARY),
    "rte": GluePreset("RTE", _GLUE_FILES, "sentence1", "sentence2", "label", _NLI2, _NLI2),
    "stsb": GluePreset("STS-B", _GLUE_FILES, "sentence1", "sentence2", "score", None, None),
    "qnli": GluePreset("QNLI", _GLUE_FILES, "question", "sentence", "label", _NLI2, _NLI2),
    "qqp": GluePreset("QQP", _GLUE_FILES, "question1", "question2", "is_duplicate",
                      ("not_duplicate", "duplicate"), _BINARY),
    "mnli": GluePreset("MNLI", _MNLI_FILES, "sentence1", "sentence2", "gold_label", _NLI3, _NLI3),
}
TEXT_TASKS = (*GLUE_PRESETS, "text")
TEXT_FORMATS = ("tsv", "csv", "jsonl")
_VALIDATION_ALIASES = ("dev", "val", "valid")
_INT = re.compile(r"[+-]?[0-9]+")


# ---------------------------------------------------------------------------------------------- files

def _glue_file(task: str, preset: GluePreset, data: Path, split: str) -> Path:
    if split not in preset.files:
        raise KDCacheError(f"{data}: unknown {task} split {split!r} (splits: {', '.join(preset.files)})")
    name = preset.files[split]
    if data.is_file():
        return data
    if not data.is_dir():
        raise KDCacheError(f"{data}: no such file or folder; {task} expects GLUE's {preset.folder} folder "
                           f"holding {name}")
    for path in (data / name, data / preset.folder / name):
        if path.is_file():
            return path
    raise SplitMissing(f"{data / name}: missing; {task} split {split!r} reads {name} "
                       f"from GLUE's {preset.folder} folder")


def _text_file(data: Path, split: str) -> Path:
    if data.is_file():
        if data.suffix.lower().lstrip(".") not in TEXT_FORMATS:
            raise KDCacheError(f"{data}: unsupported file type {data.suffix!r}; use .tsv, .csv or .jsonl")
        return data
    if not data.is_dir():
        raise KDCacheError(f"{data}: no such file or folder; "
                           "task 'text' expects a .tsv/.csv/.jsonl file or a folder of them")
    return split_file(data, split, (split, *(_VALIDATION_ALIASES if split == "validation" else ())), TEXT_FORMATS)


def _csv_rows(reader: Any, path: Path) -> Iterator[tuple[int, list[str]]]:
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise KDCacheError(f"{path}: line {reader.line_num}: unreadable row ({exc})") from exc
        if row:  # an empty line is not a row
            yield reader.line_num, row


def json_rows(f: Any, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-empty line of a JSONL file; a line that is no JSON object is one line."""
    for line_no, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KDCacheError(f"{path}: line {line_no}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise KDCacheError(f"{path}: line {line_no}: expected a JSON object, got {type(obj).__name__}")
        yield line_no, obj


def _table(f: Any, path: Path, fmt: str, columns: tuple[str, ...]) -> tuple[list[str], Iterator[tuple[int, Any]]]:
    """(column names, rows as (line, record)); a record is a list (tsv/csv, width checked) or a dict (jsonl)."""
    if fmt == "jsonl":
        rows: Iterator[tuple[int, Any]] = json_rows(f, path)
        first = next(rows, None)
        if first is None:
            raise KDCacheError(f"{path}: empty file")
        return list(first[1]), itertools.chain([first], rows)
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(f)
    raw = _csv_rows(reader, path)
    if columns:
        header = list(columns)
    else:
        first = next(raw, None)
        if first is None:
            raise KDCacheError(f"{path}: empty file")
        header = first[1]

    def checked() -> Iterator[tuple[int, Any]]:
        for line_no, row in raw:
            if len(row) != len(header):
                raise KDCacheError(f"{path}: line {line_no} has {len(row)} fields, expected {len(header)} "
                                   f"({', '.join(header)})")
            yield line_no, row

    return header, checked()


def _key(header: list[str], name: str | None, path: Path, fmt: str, *, option: str) -> int | str | None:
    if name is None:
        return None
    if name not in header:
        raise KDCacheError(f"{path}: no column {name!r} for {option} (columns: {', '.join(map(str, header))})")
    return name if fmt == "jsonl" else header.index(name)


# ---------------------------------------------------------------------------------------------- labels

def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value)
    return None


def _regression_labels(raw: list[Any], lines: list[int], path: Path, allow_missing: bool) -> np.ndarray:
    out = np.full(len(raw), np.nan, dtype=np.float32)
    for i, value in enumerate(raw):
        if allow_missing and _is_missing(value):
            continue
        try:
            if isinstance(value, bool):
                raise ValueError
            out[i] = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise KDCacheError(f"{path}: line {lines[i]}: label {value!r} is not a number") from None
    return out


def _class_labels(raw: list[Any], lines: list[int], path: Path, names: list[str] | None,
                  spelled: dict[str, int] | None, allow_missing: bool) -> tuple[np.ndarray, list[str]]:
    """Class ids; `spelled` maps the exact file strings (GLUE), else names map first and integers are ids."""
    present = [v for v in raw if not (allow_missing and _is_missing(v))]
    if spelled is None and names is None:
        ints = [_as_int(v) for v in present]
        if ints and all(k is not None and k >= 0 for k in ints):
            names = [str(k) for k in range(max(ints) + 1)]
        else:
            names = sorted({str(v).strip() for v in present})
    by_name = spelled if spelled is not None else {str(n): k for k, n in enumerate(names)}
    out = np.full(len(raw), MISSING_CLASS, dtype=np.int64)
    for i, value in enumerate(raw):
        if allow_missing and _is_missing(value):
            continue
        text = str(value).strip()
        k = by_name.get(text)
        if k is None and spelled is None:
            k = _as_int(value)
        if k is None or not 0 <= k < len(names):
            allowed = ", ".join(spelled) if spelled is not None else f"{', '.join(names)} or ids 0..{len(names) - 1}"
            raise KDCacheError(f"{path}: line {lines[i]}: label {value!r} is not one of {allowed}")
        out[i] = k
    return out, list(names)


# ---------------------------------------------------------------------------------------------- rows and batches

class _TextRows(torch.utils.data.Dataset):
    """The rows' text, tokenised when read (in a DataLoader worker, a batch per call: `__getitems__`), so loading
    a split costs one pass over the file and no tokenisation: item i -> the contract's dict for row i."""

    def __init__(self, texts: list[str], pairs: list[str] | None, labels: np.ndarray, tokenizer: Any,
                 max_length: int, index: np.ndarray | None = None) -> None:
        self.texts, self.pairs, self.labels = texts, pairs, labels
        self.tokenizer, self.max_length = tokenizer, max_length
        self.index = index  # the source row of each item, when only some rows were kept (--subset)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self.texts):
            raise IndexError(i)
        return self.__getitems__([i])[0]

    def __getitems__(self, rows: list[int]) -> list[dict[str, Any]]:
        """Rows tokenised in one call: the same ids as one call per row (no padding), far faster."""
        encoded = self.tokenizer([self.texts[i] for i in rows],
                                 None if self.pairs is None else [self.pairs[i] for i in rows],
                                 truncation=True, max_length=self.max_length)
        types = encoded.get("token_type_ids")
        items = []
        for k, i in enumerate(rows):
            ids = list(encoded["input_ids"][k])
            inputs = {"input_ids": ids} if types is None else {"input_ids": ids, "token_type_ids": list(types[k])}
            label = self.labels[i]
            items.append({"inputs": inputs, "label": float(label) if self.labels.dtype.kind == "f" else int(label),
                          "index": i if self.index is None else int(self.index[i]),
                          "fingerprint": fingerprint_tokens(ids)})
        return items


class _Collate:
    """Right-pads a batch to its longest row and builds attention_mask; a class so it pickles for workers."""

    def __init__(self, pad_id: int, regression: bool) -> None:
        self.pad_id, self.regression = pad_id, regression

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        width = max(len(it["inputs"]["input_ids"]) for it in items)
        names = [k for k in ("input_ids", "token_type_ids") if k in items[0]["inputs"]]
        inputs = {k: torch.full((len(items), width), self.pad_id if k == "input_ids" else 0, dtype=torch.int64)
                  for k in names}
        inputs["attention_mask"] = torch.zeros((len(items), width), dtype=torch.int64)
        for r, it in enumerate(items):
            n = len(it["inputs"]["input_ids"])
            for k in names:
                inputs[k][r, :n] = torch.tensor(it["inputs"][k], dtype=torch.int64)
            inputs["attention_mask"][r, :n] = 1
        return Batch(
            inputs=inputs,
            labels=torch.tensor([it["label"] for it in items], dtype=torch.float32 if self.regression else torch.int64),
            index=torch.tensor([it["index"] for it in items], dtype=torch.int64),
            fingerprint=np.array([it["fingerprint"] for it in items], dtype=np.uint64),
        )


def _prepare(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.inputs.items()}


# ---------------------------------------------------------------------------------------------- entry point

@dataclass
class _Layout:
    """Where a split's rows are and how to read them: the file, its format, and which columns hold what."""

    path: Path
    fmt: str
    columns: tuple[str, ...]
    text: str | None
    pair: str | None
    label: str | None
    regression: bool
    names: tuple[str, ...] | list[str] | None
    spelled: dict[str, int] | None
    glue: bool


def _layout(task: str, data: Path, split: str, text_column: str | None, text_pair_column: str | None,
            label_column: str | None, label_names: list[str] | None, regression: bool) -> _Layout:
    preset = GLUE_PRESETS.get(task)
    if preset is None:
        if regression and label_names:
            raise KDCacheError(f"{data}: regression takes no label_names")
        path = _text_file(data, split)
        return _Layout(path, path.suffix.lower().lstrip("."), (), text_column, text_pair_column, label_column,
                       regression, label_names, None, glue=False)
    given = [n for n, v in (("text_column", text_column), ("text_pair_column", text_pair_column),
                            ("label_column", label_column), ("label_names", label_names),
                            ("regression", regression)) if v]
    if given:
        raise KDCacheError(f"{data}: {', '.join(given)} apply only to task 'text'; {task} has fixed columns")
    spelled = None if preset.label_values is None else {v: k for k, v in enumerate(preset.label_values)}
    return _Layout(_glue_file(task, preset, data, split), "tsv", preset.columns if split in preset.headerless else (),
                   preset.text, preset.pair, preset.label, preset.label_names is None, preset.label_names, spelled,
                   glue=True)


def _read_columns(layout: _Layout, split: str, stop: int | None = None
                  ) -> tuple[list[str], list[str] | None, list[Any], list[int], bool]:
    """The text, pair and raw label of every data row (the first `stop`), with its line number (for error
    messages), and whether the whole file was read."""
    path = layout.path
    texts, raw_labels, lines = [], [], []
    pairs: list[str] | None = None if layout.pair is None else []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: GLUE's MRPC files start with a BOM
            header, records = _table(f, path, layout.fmt, layout.columns)
            if layout.text is None:
                raise KDCacheError(f"{path}: task 'text' needs text_column (columns: {', '.join(map(str, header))})")
            if layout.glue and split.startswith("test") and layout.label not in header:
                layout.label = None  # GLUE test files carry no labels
            keys = [_key(header, name, path, layout.fmt, option=option) for name, option in
                    ((layout.text, "text_column"), (layout.pair, "text_pair_column"), (layout.label, "label_column"))]
            whole = True
            for line_no, record in records:
                if stop is not None and len(texts) >= stop:
                    whole = False
                    break
                try:
                    values = [record[k] if k is not None else None for k in keys]
                except KeyError as exc:
                    raise KDCacheError(f"{path}: line {line_no}: no {exc.args[0]!r} field") from None
                for value, name in zip(values[:2], (layout.text, layout.pair)):
                    if name is not None and not isinstance(value, str):
                        raise KDCacheError(f"{path}: line {line_no}: {name!r} is {type(value).__name__}, not text")
                texts.append(values[0])
                if pairs is not None:
                    pairs.append(values[1])
                raw_labels.append(values[2])
                lines.append(line_no)
    except UnicodeDecodeError as exc:
        raise KDCacheError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise KDCacheError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not texts:
        raise KDCacheError(f"{path}: {'empty file' if layout.columns else 'a header but no data rows'}")
    return texts, pairs, raw_labels, lines, whole


def _labels_of(layout: _Layout, task: str, raw: list[Any], lines: list[int]
               ) -> tuple[np.ndarray, list[str] | None, str | None]:
    """(labels, label names, where the names came from), for classification or regression."""
    allow_missing = not layout.glue  # a GLUE training or dev row must carry one of the task's labels
    names = layout.names
    if layout.label is None:
        labels = np.full(len(raw), np.nan if layout.regression else MISSING_CLASS,
                         np.float32 if layout.regression else np.int64)
        names = None if names is None or layout.regression else list(names)
    elif layout.regression:
        labels, names = _regression_labels(raw, lines, layout.path, allow_missing), None
    else:
        labels, names = _class_labels(raw, lines, layout.path, None if names is None else list(names),
                                      layout.spelled, allow_missing)
    if names is None or layout.regression:
        return labels, names, None
    if layout.glue:
        return labels, names, f"task {task}"
    if layout.names is not None:
        return labels, names, "label_names"
    if names == [str(k) for k in range(len(names))]:
        return labels, names, LABEL_IDS  # _class_labels read every label as an id >= 0
    return labels, names, "sorted label values"


def load_text_split(task: str, data: str | Path, split: str, tokenizer: Any, *, max_length: int = 128,
                    text_column: str | None = None, text_pair_column: str | None = None,
                    label_column: str | None = None, label_names: list[str] | None = None,
                    regression: bool = False, limit: int | None = None, subset: int | None = None) -> SplitData:
    """Tokenise one split up front, so every cached logit row is tied to the exact token ids the teacher saw."""
    data = Path(data).expanduser()
    if task not in TEXT_TASKS:
        raise KDCacheError(f"{data}: unknown text task {task!r}; choose one of {', '.join(TEXT_TASKS)}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise KDCacheError(f"{data}: max_length must be a positive integer, got {max_length!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise KDCacheError(f"{data}: limit must be a positive integer, got {limit!r}")
    layout = _layout(task, data, split, text_column, text_pair_column, label_column, label_names, regression)
    names_fixed = layout.glue or layout.regression or layout.names is not None or layout.label is None
    texts, pairs, raw_labels, lines, whole = _read_columns(layout, split, limit if names_fixed else None)
    labels, names, names_from = _labels_of(layout, task, raw_labels, lines)

    keep = len(texts) if limit is None else min(limit, len(texts))
    rows = np.arange(keep) if subset is None else evenly_spaced_rows(keep, subset)
    dataset = _TextRows([texts[r] for r in rows], None if pairs is None else [pairs[r] for r in rows], labels[rows],
                        tokenizer, max_length, None if subset is None else rows)
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    preprocess = {
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "tokenizer_class": type(tokenizer).__name__, "max_length": max_length, "truncation": True,
        "padding": f"right, to the longest row of each batch, pad id {pad_id}",
        "text_column": layout.text, "text_pair_column": layout.pair, "label_column": layout.label,
        "label_names_from": names_from, "file": layout.path.name, "format": layout.fmt,
        "header": "none; columns by position: " + ", ".join(layout.columns) if layout.columns else "first row",
        "rows_in_file": len(texts) if whole else None, "limit": limit,
    }
    if subset is not None:
        preprocess.update(subset=subset, subset_rule=SUBSET_RULE)
    return SplitData(task=task, split=split, source=os.path.abspath(layout.path), modality="text",
                     kind="regression" if layout.regression else "classification", label_names=names,
                     dataset=dataset, collate=_Collate(int(pad_id), layout.regression), prepare=_prepare,
                     preprocess=preprocess)


__all__ = ["GLUE_PRESETS", "GluePreset", "TEXT_FORMATS", "TEXT_TASKS", "load_text_split"]


def tokenizer_zip(tokenizer: Any) -> tuple[bytes, list[str]]:
    """The tokenizer's saved files as a deterministic zip, so a cache can re-derive text fingerprints alone."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        names = sorted(p.name for p in Path(tmp).iterdir() if p.is_file())
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in names:
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                archive.writestr(info, (Path(tmp) / name).read_bytes(), zipfile.ZIP_DEFLATED)
    return buffer.getvalue(), names
