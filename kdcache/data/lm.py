"""Language-model data: a split is one token stream cut into fixed windows, the rows of a token-level cache.

Input is plain text (`.txt`, one document per non-empty line), JSONL (one object per line, the text in
`--text-column`, default `text`) or Parquet (the same column; needs pyarrow), as a file (read for the split asked
for, usually train) or a
folder holding `train.*`, `validation.*` (or `dev.*`, `val.*`, `valid.*`) and `test.*`. Every document is tokenised
without special tokens and followed by the tokenizer's EOS; the concatenation is cut into windows of `seq_len`
tokens, the last one shorter (schema.WINDOW_RULE). Row n is window n; its label is the token that follows it (the
target of its last position), -1 after the stream's end; its fingerprint hashes exactly its token ids.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.data.base import MISSING_CLASS, Batch, SplitData, split_file
from kdcache.data.text import json_rows
from kdcache.errors import KDCacheError
from kdcache.fingerprint import fingerprint_tokens

LM_FORMATS = ("txt", "jsonl", "parquet")
DEFAULT_TEXT_COLUMN = "text"
_ALIASES = {"validation": ("validation", "dev", "val", "valid")}
#: Documents tokenised per tokenizer call while the stream is built.
_TOKENIZE_BATCH = 1024


def lm_file(data: Path, split: str) -> Path:
    """The file of one split: `data` itself, or `<split>.{txt,jsonl,parquet}` in the folder."""
    if data.is_file():
        if data.suffix.lower().lstrip(".") not in LM_FORMATS:
            raise KDCacheError(f"{data}: unsupported file type {data.suffix!r} for --task lm; use .txt, .jsonl or "
                               ".parquet")
        return data  # the split asked for (as task `text` reads a file); a cache records each split's own file
    if not data.is_dir():
        raise KDCacheError(f"{data}: no such file or folder; --task lm reads a .txt/.jsonl/.parquet file or a folder "
                           "of them")
    return split_file(data, split, _ALIASES.get(split, (split,)), LM_FORMATS)


def read_documents(path: Path, text_column: str | None) -> list[str]:
    """The documents of one file, in file order; every problem is one line naming the file (and the line)."""
    fmt = path.suffix.lower().lstrip(".")
    column = text_column or DEFAULT_TEXT_COLUMN
    if fmt == "txt" and text_column is not None:
        raise KDCacheError(f"{path}: --text-column applies to JSONL and Parquet; a .txt file holds one document a line")
    try:
        if fmt == "parquet":
            return _parquet_documents(path, column)
        docs = []
        with open(path, encoding="utf-8-sig") as f:
            if fmt == "txt":
                return [line.rstrip("\r\n") for line in f if line.strip()]
            for line_no, obj in json_rows(f, path):  # the same JSONL reading as a text task's
                if column not in obj:
                    raise KDCacheError(f"{path}: line {line_no}: no text column {column!r} (fields: "
                                       f"{', '.join(map(str, obj)) or 'none'}); pass --text-column")
                if not isinstance(obj[column], str):
                    raise KDCacheError(f"{path}: line {line_no}: {column!r} is {type(obj[column]).__name__}, not text")
                docs.append(obj[column])
    except UnicodeDecodeError as exc:
        raise KDCacheError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise KDCacheError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return docs


def _parquet_documents(path: Path, column: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise KDCacheError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert it to JSONL") \
            from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise KDCacheError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from exc
    if column not in table.column_names:
        raise KDCacheError(f"{path}: no text column {column!r} (columns: {', '.join(table.column_names)}); pass "
                           "--text-column")
    values = table.column(column).to_pylist()
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise KDCacheError(f"{path}: row {row}: {column!r} is {type(value).__name__}, not text")
    return values


def token_stream(docs: list[str], tokenizer: Any, where: str) -> np.ndarray:
    """Every document's token ids followed by the EOS id, concatenated (int64)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise KDCacheError(f"{where}: the tokenizer has no EOS token, which --task lm puts after every document; "
                           "use the language model's own tokenizer")
    parts = []
    for start in range(0, len(docs), _TOKENIZE_BATCH):
        encoded = tokenizer(docs[start:start + _TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]
        parts.extend(np.asarray([*ids, eos], dtype=np.int64) for ids in encoded)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class _Windows(torch.utils.data.Dataset):
    """Window n of the stream, with the token after it as its label: item n -> the contract's dict for row n."""

    def __init__(self, stream: np.ndarray, seq_len: int) -> None:
        self.stream, self.seq_len = stream, seq_len

    def __len__(self) -> int:
        return -(-len(self.stream) // self.seq_len)

    def __getitem__(self, n: int) -> dict[str, Any]:
        if not 0 <= n < len(self):
            raise IndexError(n)
        start, stop = n * self.seq_len, (n + 1) * self.seq_len
        ids = self.stream[start:stop]
        label = int(self.stream[stop]) if stop < len(self.stream) else MISSING_CLASS
        return {"inputs": {"input_ids": ids}, "label": label, "index": n, "fingerprint": fingerprint_tokens(ids)}


class _CachedWindows(torch.utils.data.Dataset):
    """The windows a token-level cache stores (`input_ids`, `lengths`, `labels`): a student reads the teacher's very
    token ids and never tokenises again; each row's fingerprint is recomputed from its ids, so the row check
    (kdcache/train/inputs.py) proves them against the cached fingerprints."""

    def __init__(self, ids: np.ndarray, lengths: np.ndarray, labels: np.ndarray) -> None:
        self.ids, self.lengths, self.labels = ids, np.asarray(lengths, dtype=np.int64), np.asarray(labels)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, n: int) -> dict[str, Any]:
        if not 0 <= n < len(self):
            raise IndexError(n)
        ids = np.asarray(self.ids[n, :self.lengths[n]], dtype=np.int64)
        return {"inputs": {"input_ids": ids}, "label": int(self.labels[n]), "index": n,
                "fingerprint": fingerprint_tokens(ids)}


def cached_windows_split(ids: np.ndarray, lengths: np.ndarray, labels: np.ndarray, *, split: str, source: str,
                         preprocess: dict[str, Any] | None = None) -> SplitData:
    """A split of a token-level cache as a student's data: its stored windows, right-padded to S by the collate."""
    if ids.ndim != 2 or len(ids) != len(lengths) or len(ids) != len(labels):
        raise KDCacheError(f"{source}: input_ids {ids.shape}, lengths ({len(lengths)},) and labels ({len(labels)},) "
                           "do not describe the same windows")
    if len(lengths) and (int(np.min(lengths)) < 1 or int(np.max(lengths)) > ids.shape[1]):
        raise KDCacheError(f"{source}: a window's length is outside 1..{ids.shape[1]}")
    seq_len = int(ids.shape[1])
    return SplitData(task="lm", split=split, source=source, modality="text", kind="lm", label_names=None,
                     dataset=_CachedWindows(ids, lengths, labels), collate=_Collate(seq_len), prepare=_prepare,
                     preprocess={**(preprocess or {}), "seq_len": seq_len, "read_from": "cache"})


class _Collate:
    """Windows padded to S with id 0 (positions past a row's length are masked and never read as tokens)."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        ids = torch.zeros((len(items), self.seq_len), dtype=torch.int64)
        mask = torch.zeros((len(items), self.seq_len), dtype=torch.int64)
        for r, it in enumerate(items):
            n = len(it["inputs"]["input_ids"])
            ids[r, :n] = torch.from_numpy(np.asarray(it["inputs"]["input_ids"], dtype=np.int64))
            mask[r, :n] = 1
        return Batch(inputs={"input_ids": ids, "attention_mask": mask},
                     labels=torch.tensor([it["label"] for it in items], dtype=torch.int64),
                     index=torch.tensor([it["index"] for it in items], dtype=torch.int64),
                     fingerprint=np.array([it["fingerprint"] for it in items], dtype=np.uint64))


def _prepare(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.inputs.items()}


#: The end-of-document token of a tokenizer `train_byte_bpe` makes (GPT-2's spelling).
EOS_TOKEN = "<|endoftext|>"


def train_byte_bpe(docs: list[str], vocab_size: int) -> Any:
    """A byte-level BPE of `vocab_size` tokens (the 256 bytes, EOS, and merges learnt from `docs`), made here with
    `tokenizers`: an LM can be trained, cached and distilled with nothing downloaded. Every text is encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise KDCacheError(f"--vocab-size {vocab_size}: a byte-level BPE holds the 256 bytes and EOS at least (257)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN)


def next_token_targets(input_ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
                       ignore: int = -100) -> torch.Tensor:
    """The token each position predicts, by the cache's alignment rule (schema.ALIGNMENT_RULE): input_ids[j + 1]
    within a row, the row's label (the next row's first token) at its last position, `ignore` past the row's length
    and after the stream's end. [B, S] int64."""
    rows, positions = input_ids.shape
    j = torch.arange(positions, device=input_ids.device)[None, :]
    shifted = torch.cat([input_ids[:, 1:].long(), torch.zeros_like(input_ids[:, :1]).long()], dim=1)
    last = (lengths.long() - 1)[:, None]
    targets = torch.where(j == last, labels.long()[:, None].expand(rows, positions), shifted)
    return torch.where((j > last) | (targets < 0), torch.full_like(targets, ignore), targets)


def load_lm_split(data: str | Path, split: str, tokenizer: Any, *, seq_len: int | None,
                  text_column: str | None = None) -> SplitData:
    """Tokenise one split into its stream and windows up front: the row count is the stream's, so it is known before
    the first write, and every row is bound to the exact token ids the teacher saw."""
    data = Path(data).expanduser()
    if seq_len is None:
        raise KDCacheError("--task lm needs --seq-len S, the tokens per row (at most the teacher's positions)")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise KDCacheError(f"--seq-len must be a positive integer, got {seq_len!r}")
    path = lm_file(data, split)
    docs = read_documents(path, text_column)
    stream = token_stream(docs, tokenizer, str(path))
    if not len(stream):
        raise KDCacheError(f"{path}: empty corpus (no documents in split {split!r})")
    preprocess = {
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "tokenizer_class": type(tokenizer).__name__, "seq_len": seq_len, "eos_id": int(tokenizer.eos_token_id),
        "add_special_tokens": False, "text_column": None if path.suffix.lower() == ".txt" else
        (text_column or DEFAULT_TEXT_COLUMN), "file": path.name, "format": path.suffix.lower().lstrip("."),
        "documents": len(docs), "tokens": int(len(stream)),
        "stream_sha256": hashlib.sha256(np.ascontiguousarray(stream, dtype="<i8").tobytes()).hexdigest(),
    }
    return SplitData(task="lm", split=split, source=os.path.abspath(path), modality="text", kind="lm",
                     label_names=None, dataset=_Windows(stream, seq_len), collate=_Collate(seq_len), prepare=_prepare,
                     preprocess=preprocess)


__all__ = ["EOS_TOKEN", "LM_FORMATS", "cached_windows_split",
           "load_lm_split", "next_token_targets", "train_byte_bpe", "read_documents", "token_stream"]
