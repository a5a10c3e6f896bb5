"""Recipe: train a GPT-style causal language model from a config, on next-token cross-entropy: a teacher to cache.

    kdcache train --task lm --model gpt.json --vocab-size 2048 --data corpus/ --seq-len 128 --epochs 4 --out runs/gpt
    kdcache cache-teacher --task lm --teacher runs/gpt/model --data corpus/ --seq-len 128 --topk 32 --out lm.kdcache

Features, and the flags that control them:
- model: a Hugging Face config JSON (`--model`, any built-in `model_type` with a causal-LM class: gpt2, llama, ...),
  `vocab_size` defaulting to the tokenizer's, weights seeded by `--seed`;
- tokenizer: a folder (`--tokenizer DIR`), or a byte-level BPE of `--vocab-size N` tokens trained here on the train
  split (`kdcache.data.lm.train_byte_bpe`), saved with the model;
- data: the windows `cache-teacher --task lm` caches (`--data`, `--seq-len`, `--text-column`): the same token streams,
  the same rows, and the same alignment rule (`kdcache.data.lm.next_token_targets`): every position is trained, the
  last one of a row on the next row's first token;
- optimisation: AdamW (`--lr`, default 3e-4; `--weight-decay`, default 0.1), linear warm-up (`--warmup-ratio`, default
  0.05) then cosine decay, gradient clipping (`--max-grad-norm`, default 1), `--batch-size` rows (default 32),
  `--epochs` (default 1) or `--max-steps`; rows shuffled by a generator seeded with `--seed`;
- measured per epoch (`metrics.jsonl`): training loss, validation loss and perplexity on `--val-split` (default
  `validation`, when the data has it), tokens/s; `summary.json` at the end;
- output: `RUN/model`, a Hugging Face folder with the tokenizer, which `cache-teacher --teacher` loads as it is;
  `--save-every N` also keeps the model every N epochs as `RUN/checkpoints/epoch-NNNN` (with the tokenizer and
  kdcache-checkpoint.json: epoch, validation perplexity), the teacher's checkpoints that `cache-teacher --checkpoints`
  stores for `distill --method prokd`.

One process, no resume: this is the teacher-making step of the LM quickstart. Students of a cache train through the
shared loop (`kdcache distill`, kdcache/methods/tokens.py); this loop may fold into it later.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kdcache.data.base import SplitData
from kdcache.data.lm import load_lm_split, next_token_targets
from kdcache.errors import KDCacheError, SplitMissing
from kdcache.progress import progress_bar
from kdcache.runtime import command_line, resolve_device, utc_now

#: What marks an LM training folder (so --overwrite deletes one, and nothing else), and what such a folder holds.
RUN_MARKER = "kdcache-lm-run.json"
RUN_ENTRIES = (RUN_MARKER, "model", "metrics.jsonl", "summary.json", "checkpoints")


@dataclass
class TrainLMConfig:
    """Everything `train --task lm` needs; the CLI fills it from flags, scripts build it directly."""

    model: str  # a Hugging Face config JSON
    tokenizer: str | None  # a tokenizer folder; None: a byte-level BPE of `vocab_size` is trained on the train split
    data: str
    out: str | Path
    seq_len: int
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"
    val_split: str = "validation"
    text_column: str | None = None
    overwrite: bool = False
    progress: bool = True
    vocab_size: int | None = None  # without `tokenizer`: the BPE's vocabulary
    save_every: int | None = None  # keep the model every N epochs in OUT/checkpoints/epoch-NNNN (Pro-KD's teachers)


def train_lm(cfg: TrainLMConfig) -> dict[str, Any]:
    """Run the recipe; returns the summary also written to OUT/summary.json."""
    from kdcache.models.hf import causal_lm_from_config, load_tokenizer, special_token_ids

    out = Path(cfg.out)
    _claim(out, cfg.overwrite)
    if (cfg.tokenizer is None) == (cfg.vocab_size is None):
        raise KDCacheError("train --task lm needs --tokenizer DIR, or --vocab-size N to train a byte-level BPE on the "
                           "train split (one of the two)")
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else _bpe(cfg)
    model = causal_lm_from_config(cfg.model, len(tokenizer), seed=cfg.seed, special=special_token_ids(tokenizer))
    positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.seq_len > positions:
        raise KDCacheError(f"--seq-len {cfg.seq_len} is beyond model {cfg.model}'s {positions} positions")
    train = load_lm_split(cfg.data, "train", tokenizer, seq_len=cfg.seq_len, text_column=cfg.text_column)
    try:
        val = load_lm_split(cfg.data, cfg.val_split, tokenizer, seq_len=cfg.seq_len, text_column=cfg.text_column)
    except SplitMissing:
        val = None
    device = resolve_device(cfg.device)
    model.to(device)
    loader = torch.utils.data.DataLoader(train.dataset, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed), collate_fn=train.collate)
    total = min(cfg.max_steps or math.inf, cfg.epochs * len(loader))
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: (s + 1) / warmup if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).write_text(json.dumps({"config": asdict(cfg) | {"out": str(out)}, "command": command_line(),
                                              "started": utc_now()}, indent=2, default=str) + "\n")
    metrics, step = [], 0
    with progress_bar(cfg.progress) as bar, open(out / "metrics.jsonl", "w") as log:
        task = bar.add_task("train", total=int(total), rate="")
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            start, loss_sum, tokens = time.perf_counter(), 0.0, 0
            for batch in loader:
                loss, count = _loss(model, batch, device)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimiser.step()
                schedule.step()
                loss_sum, tokens, step = loss_sum + float(loss.detach()) * count, tokens + count, step + 1
                bar.update(task, advance=1, rate=f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f} tok/s")
                if step >= total:
                    break
            seconds = time.perf_counter() - start
            row = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(tokens, 1),
                   "tokens_per_second": round(tokens / max(seconds, 1e-9), 1), **_evaluate(model, val, device)}
            metrics.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            if cfg.save_every and epoch % cfg.save_every == 0:
                _save_checkpoint(model, tokenizer, out / "checkpoints" / f"epoch-{epoch:04d}", row)
            if step >= total:
                break
    model.save_pretrained(str(out / "model"))
    tokenizer.save_pretrained(str(out / "model"))
    summary = {"task": "lm", "model": str(out / "model"), "epochs": len(metrics), "steps": step,
               "parameters": sum(p.numel() for p in model.parameters()), "train_rows": len(train),
               "train_tokens": train.preprocess["tokens"], "final": metrics[-1] if metrics else None,
               "completed": utc_now()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _save_checkpoint(model: Any, tokenizer: Any, folder: Path, row: dict[str, Any]) -> None:
    """The model as it is after an epoch, a Hugging Face folder with the tokenizer and the kdcache-checkpoint.json
    that `cache-teacher --checkpoints` reads its epoch and metric (validation perplexity, when there is a validation
    split) from; written through a temporary folder and a rename, so a folder that exists is whole (the temporary
    one is hidden, so a glob such as 'epoch-*' never matches what a kill left half-written)."""
    from kdcache.models import CHECKPOINT_FILE

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / CHECKPOINT_FILE).write_text(json.dumps({"epoch": row["epoch"], "metric": row.get("val_perplexity"),
                                                   "metric_name": "perplexity"}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _bpe(cfg: TrainLMConfig) -> Any:
    """A byte-level BPE trained on the train split's documents, saved with the model (and so stored in every cache
    of that model)."""
    from kdcache.data.lm import lm_file, read_documents, train_byte_bpe

    docs = read_documents(lm_file(Path(cfg.data).expanduser(), "train"), cfg.text_column)
    return train_byte_bpe(docs, int(cfg.vocab_size or 0))


def _loss(model: Any, batch: Any, device: torch.device) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy of a batch of windows, and how many positions it averages."""
    ids, mask = batch.inputs["input_ids"].to(device), batch.inputs["attention_mask"].to(device)
    targets = next_token_targets(ids, mask.sum(dim=1), batch.labels.to(device))
    logits = model(input_ids=ids, attention_mask=mask).logits
    count = int((targets != -100).sum())
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100), count


@torch.no_grad()
def _evaluate(model: Any, split: SplitData | None, device: torch.device, batch_size: int = 32) -> dict[str, float]:
    """Validation loss and perplexity over every position of the split (empty without one)."""
    if split is None:
        return {}
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(split), batch_size):
        batch = split.collate([split.dataset[i] for i in range(start, min(len(split), start + batch_size))])
        loss, n = _loss(model, batch, device)
        total, count = total + float(loss) * n, count + n
    mean = total / max(count, 1)
    return {"val_loss": mean, "val_perplexity": math.exp(min(mean, 50.0))}


def _claim(out: Path, overwrite: bool) -> None:
    """A taken --out is refused, or with --overwrite replaced when it is an LM training folder and nothing else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise KDCacheError(f"{out}: already exists; pass --overwrite to replace an LM training folder, or choose "
                           "another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES) if out.is_dir() else [out.name]
    if out.is_symlink() or not (out / RUN_MARKER).is_file() or foreign:
        raise KDCacheError(f"{out}: refusing to overwrite: not a kdcache LM training folder; nothing was deleted: "
                           "choose another --out")
    shutil.rmtree(out)


__all__ = ["TrainLMConfig", "train_lm"]
