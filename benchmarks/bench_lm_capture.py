"""Language-model capture (issue 22): tokens/s of `cache-teacher --task lm` against the bare teacher forward, and
bytes per token of each target kind.

    PYTHONPATH=benchmarks:tests python benchmarks/bench_lm_capture.py --corpus ../shared/data/tinyshakespeare/input.txt

The first `--lines` lines of the corpus are the train split. A byte-level BPE of `--vocab` tokens is trained on them
here, and a GPT-2 of random, seeded weights (`--layers`, `--width`, `--seq-len` positions) is the teacher: only
shapes and speed matter. The bare forward is the teacher over the same windows, in the same batches, under
`torch.inference_mode`, with nothing kept. A capture's tokens/s is the split's tokens over the seconds the recipe
records for its chunk loop (`throughput`), which covers the forward, the targets, the copies and the writes, but not
the start-up (loading, tokenising). Each kind is captured `--repeats` times, interleaved with the bare forward,
and the median is taken. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def bare_forward(teacher: Path, data: Path, seq_len: int, batch_size: int) -> float:
    """Tokens/s of the teacher alone over the split's windows."""
    from kdcache.data import DataOptions, load_split
    from kdcache.models import load_teacher

    loaded = load_teacher(str(teacher), causal_lm=True)
    split = load_split("lm", data, "train", tokenizer=loaded.tokenizer, options=DataOptions(seq_len=seq_len))
    loader = torch.utils.data.DataLoader(split.dataset, batch_size=batch_size, collate_fn=split.collate)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            loaded(split.prepare(batch, torch.device("cpu"))).float()
    return split.preprocess["tokens"] / (time.perf_counter() - start)


def capture(teacher: Path, data: Path, out: Path, seq_len: int, batch_size: int, flags: dict) -> tuple[float, float]:
    """(tokens/s, stored target bytes per token) of one capture."""
    from kdcache.cache.info import describe_cache
    from kdcache.data import DataOptions
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher

    cache_teacher(CacheTeacherConfig(teacher=str(teacher), task="lm", data=str(data), out=out, device="cpu",
                                     progress=False, batch_size=batch_size, overwrite=True,
                                     data_options=DataOptions(seq_len=seq_len), **flags))
    summary = describe_cache(out)
    from kdcache.cache import Cache

    tokens = Cache(out).split("train").split_header.dataset.preprocess["tokens"]
    seconds = summary["throughput"]["train"]["seconds"]
    return tokens / seconds, summary["splits"][0]["logits_bytes_stored"] / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--lines", type=int, default=10000)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from teachers_for_tests import make_tiny_gpt2

    kinds = {"dense": {"dtype": "float16"},
             "top-32, T = 1 (the default)": {"topk": 32},
             "top-32, T = 1..20 (the presets' temperatures)": {"topk": 32,
                                                               "lse_temperatures": tuple(map(float, range(1, 21)))},
             "top-8, T = 1": {"topk": 8, "lse_temperatures": (1.0,)},
             "sampled, N = 12": {"sample_tokens": 12}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lines = args.corpus.read_text(encoding="utf-8").splitlines()[:args.lines]
        (root / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        teacher = make_tiny_gpt2(root / "teacher", lines, vocab_size=args.vocab, positions=args.seq_len)
        import json

        config = json.loads((teacher / "config.json").read_text())
        config.update(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64))
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).save_pretrained(str(teacher))
        bare, runs = [], {k: [] for k in kinds}
        stored = {}
        for _ in range(args.repeats):
            bare.append(bare_forward(teacher, root / "train.txt", args.seq_len, args.batch_size))
            for name, flags in kinds.items():
                rate, stored[name] = capture(teacher, root / "train.txt", root / "c.kdcache", args.seq_len,
                                             args.batch_size, flags)
                runs[name].append(rate)
        base = statistics.median(bare)
        print(f"bare forward: {base:,.0f} tokens/s (median of {args.repeats})\n")
        print("| target | tokens/s | vs bare forward | stored bytes/token |\n|---|---|---|---|")
        for name in kinds:
            rate = statistics.median(runs[name])
            print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {stored[name]:.1f} |")


if __name__ == "__main__":
    main()
