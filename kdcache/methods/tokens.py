"""Token-level (language-model) losses: any method's per-row loss applied at every real position of a window, the
student's logits made a chunk of positions at a time from its final hidden states.

A causal-LM student's step output is a `TokenOutput`: the final hidden states [B, S, H] (after the model's last
norm), the output projection (`lm_head`) and the window's ids and lengths. `chunked_loss` flattens (batch,
positions) into rows, as torchtune's KD losses take (batch * tokens, vocab), and computes the logits of `chunk`
rows at a time under activation checkpointing, so neither the logits nor their log-softmax ever exist for the
whole batch: the loss's memory is [chunk, V], not [B x S, V] (the approach of Liger's fused linear losses). By
default a chunk holds CHUNK_ELEMENTS logits whatever the vocabulary (fewer positions for a larger V, as Liger sizes
its chunks), so at a fixed K the loss's peak memory does not grow with V (docs/benchmarks.md measures 4k vs 64k).

The mean is over real tokens: positions p < length whose next token exists (the alignment rule of a cached
window, `kdcache.data.lm.next_token_targets`); every chunk's masked mean is weighted by its share of them, so the
chunked loss equals the unchunked one (tests/recipes/test_lm_distill.py) for every loss that is a mean over rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kdcache.errors import KDCacheError

#: Logits (positions x vocabulary) computed at once by default: 2**24, 64 MiB in float32, so a chunk of a 4k
#: vocabulary holds 4,096 positions and one of a 64k vocabulary 256, and the loss's memory is the same.
CHUNK_ELEMENTS = 1 << 24


def chunk_positions(vocabulary: int, chunk: int | None = None) -> int:
    """Positions per chunk: `--loss-chunk` when given, else as many as keep a chunk's logits at CHUNK_ELEMENTS,
    so that a larger vocabulary costs more chunks rather than more memory."""
    if chunk is not None:
        if chunk < 1:
            raise KDCacheError(f"--loss-chunk must be at least 1, got {chunk}")
        return int(chunk)
    return max(1, CHUNK_ELEMENTS // max(1, int(vocabulary)))


def _vocabulary(head: nn.Module) -> int:
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else int(getattr(head, "out_features", 1))


@dataclass
class TokenOutput:
    """A causal-LM student's output for a batch of windows, before its output projection."""

    hidden: torch.Tensor  # [B, S, H] final hidden states
    head: nn.Module  # H -> V, the student's output projection
    input_ids: torch.Tensor  # [B, S]
    lengths: torch.Tensor  # [B] real tokens of each window

    def logits(self) -> torch.Tensor:
        """[B, S, V] float32 logits of the whole batch (evaluation, and the unchunked reference)."""
        return self.head(self.hidden.to(_head_dtype(self.head)))


def _head_dtype(head: nn.Module) -> torch.dtype:
    weight = getattr(head, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32


def token_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> TokenOutput:
    """Run a Hugging Face causal LM up to its final hidden states (its `base_model`), keeping its `lm_head` apart."""
    mask = inputs["attention_mask"]
    hidden = model.base_model(input_ids=inputs["input_ids"], attention_mask=mask)[0]
    return TokenOutput(hidden, model.get_output_embeddings(), inputs["input_ids"], mask.sum(dim=1))


def check_head(model: nn.Module, inputs: dict[str, torch.Tensor], where: str) -> None:
    """The student's logits must be its output projection of its final hidden states (true of GPT-2, Llama and most
    causal LMs; not of those that scale or cap their logits afterwards), or the chunked loss would train another
    model than the one saved: one line otherwise."""
    if model.get_output_embeddings() is None:
        raise KDCacheError(f"student {where} ({type(model).__name__}) has no output projection (lm_head) to compute "
                           "its logits a chunk of positions at a time")
    with torch.inference_mode():
        whole = model(**inputs).logits.float()
        parts = token_output(model, inputs).logits().float()
    if whole.shape != parts.shape or not torch.allclose(whole, parts, rtol=1e-4, atol=1e-4):
        raise KDCacheError(f"student {where} ({type(model).__name__}) transforms its logits after its output "
                           "projection (scaling or capping them); the chunked token loss supports causal LMs whose "
                           "logits are lm_head(final hidden states), such as GPT-2 and Llama")


def next_token_ids(output: TokenOutput, labels: torch.Tensor) -> torch.Tensor:
    """[B, S] the token each position predicts, -1 past a window's length and after the stream's end."""
    from kdcache.data.lm import next_token_targets

    return next_token_targets(output.input_ids, output.lengths, labels, ignore=-1)


def flat_rows(target: Any, rows: int) -> Any:
    """A target (a tensor or a typed target of kdcache.methods.targets) with (batch, positions) flattened into rows."""
    if target is None:
        return None
    if isinstance(target, torch.Tensor):
        return target.reshape(rows, *target.shape[2:])
    values = {f.name: getattr(target, f.name) for f in fields(target)}
    return replace(target, **{k: v.reshape(rows, *v.shape[2:]) for k, v in values.items()
                              if isinstance(v, torch.Tensor)})


def rows_of(target: Any, start: int, stop: int) -> Any:
    """Rows start:stop of a flattened target."""
    if target is None:
        return None
    if isinstance(target, torch.Tensor):
        return target[start:stop]
    values = {f.name: getattr(target, f.name) for f in fields(target)}
    return replace(target, **{k: v[start:stop] for k, v in values.items() if isinstance(v, torch.Tensor)})


RowLoss = Callable[[torch.Tensor, Any, torch.Tensor, torch.Tensor], torch.Tensor]


def chunked_loss(output: TokenOutput, target: Any, labels: torch.Tensor, row_loss: RowLoss, *,
                 chunk: int | None = None, checkpointed: bool = True) -> torch.Tensor:
    """The mean of `row_loss` over the batch's real tokens, its logits computed `chunk` positions at a time.

    Args:
        output: the student's `TokenOutput` for the batch.
        target: the teacher's target for the batch, [B, S, ...] (a tensor or a typed target), or None.
        labels: (B,) each window's next token (the cache's labels), -1 after the stream's end.
        row_loss: (logits (R, V), target rows, next-token ids (R,) with -1 for padding, mask (R,) bool) -> the
            masked mean over the R rows; a method's loss.
        chunk: rows (positions) per chunk; None: `chunk_positions`'s budget for the head's vocabulary.
        checkpointed: recompute each chunk's logits in the backward pass rather than keep them (the point of
            chunking; off only to compare with the plain computation).
    """
    chunk = chunk_positions(_vocabulary(output.head), chunk)
    batch, positions = output.input_ids.shape
    rows = batch * positions
    ids = next_token_ids(output, labels).reshape(rows)
    mask = ids >= 0
    hidden = output.hidden.reshape(rows, -1)
    flat = flat_rows(target, rows)
    total = mask.sum().clamp(min=1).to(torch.float32)
    dtype = _head_dtype(output.head)
    loss = None
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        part_target, part_ids, part_mask = rows_of(flat, start, stop), ids[start:stop], mask[start:stop]

        def piece(h: torch.Tensor, t: Any = part_target, y: torch.Tensor = part_ids,
                  m: torch.Tensor = part_mask) -> torch.Tensor:
            return row_loss(output.head(h.to(dtype)), t, y, m)

        part = hidden[start:stop]
        if checkpointed and torch.is_grad_enabled() and stop - start < rows:
            value = checkpoint(piece, part, use_reentrant=False)
        else:
            value = piece(part)
        weighted = value * (part_mask.sum().to(torch.float32) / total)
        loss = weighted if loss is None else loss + weighted
    return loss


def perplexity_sums(output: TokenOutput, labels: torch.Tensor, teacher_top: torch.Tensor | None, *,
                    chunk: int | None = None) -> tuple[float, int, int]:
    """(sum of next-token CE, real tokens, tokens whose student argmax is the teacher's top id) over a batch, a
    chunk of positions at a time (no gradients). `teacher_top`: [B, S] the teacher's most probable id."""
    batch, positions = output.input_ids.shape
    rows = batch * positions
    ids = next_token_ids(output, labels).reshape(rows)
    hidden = output.hidden.reshape(rows, -1)
    top = teacher_top.reshape(rows) if teacher_top is not None else None
    chunk = chunk_positions(_vocabulary(output.head), chunk)
    dtype = _head_dtype(output.head)
    ce, agree = torch.zeros((), dtype=torch.float64, device=ids.device), torch.zeros((), dtype=torch.int64,
                                                                                     device=ids.device)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        logits = output.head(hidden[start:stop].to(dtype)).float()
        y = ids[start:stop]
        ce += torch.nn.functional.cross_entropy(logits, y, ignore_index=-1, reduction="sum").double()
        if top is not None:
            agree += ((logits.argmax(dim=-1) == top[start:stop]) & (y >= 0)).sum()
    return float(ce), int((ids >= 0).sum()), int(agree)


__all__ = ["CHUNK_ELEMENTS", "TokenOutput", "check_head", "chunk_positions", "chunked_loss", "flat_rows",
           "next_token_ids", "perplexity_sums", "rows_of", "token_output"]
