"""Tiny teachers for tests, importable as `teachers_for_tests:NAME` (the tests folder is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def make_tiny_bert(directory: Path, tokenizer, *, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-layer BERT built from a config (no download), saved with its tokenizer as a HF folder."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, num_labels=num_labels)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def make_tiny_encoder(directory: Path, tokenizer, *, layers: int = 4, model_type: str = "bert", seed: int = 0) -> Path:
    """A pre-trained-encoder stand-in: a bare `layers`-layer encoder (no classification head, like the
    sentence-transformers MiniLM folder) built from a config, saved with its tokenizer as a HF folder."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(seed)
    sizes = ({"dim": 32, "n_layers": layers, "n_heads": 2, "hidden_dim": 64} if model_type == "distilbert" else
             {"hidden_size": 32, "num_hidden_layers": layers, "num_attention_heads": 2, "intermediate_size": 64})
    if model_type == "roberta":
        sizes["pad_token_id"] = 0  # the tiny tokenizer's [PAD]
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), max_position_embeddings=256, **sizes)
    AutoModel.from_config(config).eval().save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


class NaNOnBrightRows(nn.Module):
    """Linear on flattened input, but NaN for rows whose mean input exceeds a threshold: a broken teacher."""

    def __init__(self, num_classes: int = 10, in_features: int = 64) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        out = self.linear(x)
        return torch.where((x.mean(1) > 0.3)[:, None], torch.full_like(out, float("nan")), out)


def nan_teacher(num_classes: int = 10) -> nn.Module:
    return NaNOnBrightRows(num_classes)


def linear_digits(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))


def three_outputs() -> nn.Module:
    """A student factory that ignores the task's width: 3 outputs whatever the cache says."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def dropout_mlp(num_classes: int = 2, in_features: int = 16) -> nn.Module:
    """A student whose steps draw random numbers (dropout): what a sweep's students must not share."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 16), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(16, num_classes))


class LinearDigitsThatDies(nn.Sequential):
    """`linear_digits` (same weights, same outputs) whose process kills itself with SIGKILL once it has computed
    KDCACHE_TEST_KILL_AFTER rows, on the torchrun rank KDCACHE_TEST_KILL_RANK only: a deterministic crash of one
    rank mid-capture. With KDCACHE_TEST_KILL_ONCE_STORED (the cache's path) it waits, before the kill, until some
    rows of the train split are stored there, however slowly the background writer runs. Without those variables it
    is `linear_digits`."""

    rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os
        import signal

        out = super().forward(x)
        rank, after = os.environ.get("KDCACHE_TEST_KILL_RANK"), os.environ.get("KDCACHE_TEST_KILL_AFTER")
        if rank is not None and after is not None and os.environ.get("RANK", "0") == rank:
            self.rows += len(x)
            if self.rows >= int(after):
                cache = os.environ.get("KDCACHE_TEST_KILL_ONCE_STORED")
                if cache:
                    _wait_until_train_rows_are_stored(Path(cache))
                os.kill(os.getpid(), signal.SIGKILL)
        return out


def _wait_until_train_rows_are_stored(cache: Path, limit_s: float = 120.0) -> None:
    """Until a chunk of the train split is recorded."""
    import time

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if any((cache / ".kdcache-progress" / "train").glob("*.json")):
            return
        time.sleep(0.05)


def linear_digits_that_dies(num_classes: int = 10) -> nn.Module:
    return LinearDigitsThatDies(nn.Flatten(), nn.Linear(64, num_classes))


#: The vocabulary of the tiny tokenizer (and of synthetic sentences built from it).
WORDS = (
    "the a an of and to in is it that this was for on with as but not no film movie story good bad great "
    "best worst funny boring love hate one all more most very too its his her he she they we you i be have "
    "has had are were been being do does did can could would should will may might must than then there "
    "their what which who whom how why when where so if or by from at about into over after before under"
).split()


def make_tiny_tokenizer(directory: Path):
    """A real BERT WordPiece tokenizer over ~150 words and single characters: small, offline, deterministic."""
    from transformers import AutoTokenizer, BertTokenizerFast

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'\"-:;()&$%/")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + chars + ["##" + c for c in chars]
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    try:  # transformers >= 5 builds the WordPiece model from a vocabulary mapping
        tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab_file.read_text().split())})
    except TypeError:  # transformers 4.x reads the vocabulary file
        tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    tokenizer.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


def make_tiny_gpt2(directory: Path, corpus: list[str], *, vocab_size: int = 120, positions: int = 32, seed: int = 0,
                   tie: bool = True, outputs: int | None = None) -> Path:
    """A causal language model teacher for --task lm, offline: a byte-level BPE trained here on `corpus` (EOS
    `<|endoftext|>`) and a 2-layer GPT-2 of random, seeded weights (`outputs`: its head's width, by default the
    tokenizer's vocabulary), saved together as a HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=outputs or len(tokenizer), n_positions=positions, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        tie_word_embeddings=tie)
    GPT2LMHeadModel(config).eval().save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory
