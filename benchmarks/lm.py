"""Issue 22's measurement: which token-level target teaches a small causal LM best, from one teacher's caches?
Tiny Shakespeare, through the CLI, seed-paired.

    python benchmarks/reproduce.py lm [--scale tiny|cpu] [--seeds 5] [--first-seed 0] [--reuse]

Setup: the corpus split by lines, the first 90% train and the rest validation; `kdcache train --task lm` trains a
byte-level BPE of `vocab` tokens there (small enough that a dense cache of every position's full distribution
fits, so dense KD is a reference and not a guess; large enough that 8 or 32 ids leave a real tail) and a GPT-2
teacher. Four captures of the teacher: dense logits; top-8; top-32 with random projections of its hidden layers
(curriculum extraction reads those, every other arm only the top-32); RS-KD's sampled ids (`sample_draws` draws
at T = 1, about 12 unique ids a position). Arms, every one the same student, epochs, batch, rate and seed:
- `ce` (`distill --method ce`: the tokens alone) and `train-ce` (`kdcache train --task lm`, the same student
  without a cache: the speed reference);
- `dense`, `top8-bucket`, `top8-renorm`, `top32-bucket`, `top32-renorm`, `rs-kd`: vanilla KD (T = 1, alpha 0.5),
  the top-k tail as one exact bucket or renormalised away;
- `continuation-top32`: Continuation-KD on the top-32 cache;
- `curriculum`: its student layers fitted to the projections a phase each (`--phase-epochs`), then to the top-32
  targets: against `top32-bucket`, the one-shot distillation of the same budget.
Selection: validation perplexity (lower is better), the best epoch's; there is no test split (the issue's setup).
`--reuse` keeps a teacher and caches already in the output folder (another process's seeds: `--first-seed`).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from reproduce import DATA, Result, RESULT_COLUMNS, Runner, _row, write_results

LM_SCALES = {
    # lines: of the corpus (None: all); teacher/student: GPT-2 configs; draws: RS-KD draws per position
    "tiny": {"lines": 600, "vocab": 300, "seq_len": 32, "teacher": {"n_embd": 32, "n_layer": 2, "n_head": 2},
             "teacher_epochs": 1, "student": {"n_embd": 16, "n_layer": 2, "n_head": 2}, "epochs": 3, "batch": 16,
             "lr": 1e-3, "draws": 8, "hidden": "1,2", "proj_dim": 8, "phases": "1,1"},
    "cpu": {"lines": None, "vocab": 1024, "seq_len": 128, "teacher": {"n_embd": 192, "n_layer": 4, "n_head": 4},
            "teacher_epochs": 8, "student": {"n_embd": 64, "n_layer": 2, "n_head": 2}, "epochs": 4, "batch": 32,
            "lr": 1e-3, "draws": 18, "hidden": "2,4", "proj_dim": 64, "phases": "1,1"},
}
CAPTURES = {"dense": [], "top8": ["--topk", 8, "--lse-temperatures", 1], "top32": ["--topk", 32,
            "--lse-temperatures", 1], "sampled": ["--sample-tokens", None, "--sample-temperature", 1]}
ARMS = {
    "ce": ("top32", ["--method", "ce"]),
    "dense": ("dense", ["--method", "vanilla"]),
    "top8-bucket": ("top8", ["--method", "vanilla", "--topk-tail", "bucket"]),
    "top8-renorm": ("top8", ["--method", "vanilla", "--topk-tail", "renormalised"]),
    "top32-bucket": ("top32", ["--method", "vanilla", "--topk-tail", "bucket"]),
    "top32-renorm": ("top32", ["--method", "vanilla", "--topk-tail", "renormalised"]),
    "rs-kd": ("sampled", ["--method", "vanilla"]),
    "continuation-top32": ("top32", ["--method", "continuation"]),
    "curriculum": ("top32", ["--method", "curriculum"]),
}


def split_corpus(corpus: Path, folder: Path, lines: int | None) -> dict[str, int]:
    """train.txt (the first 90% of the lines) and validation.txt (the rest) in `folder`; their line counts."""
    text = corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
    cut = len(text) * 9 // 10
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("".join(text[:cut]), encoding="utf-8")
    (folder / "validation.txt").write_text("".join(text[cut:]), encoding="utf-8")
    return {"train": cut, "validation": len(text) - cut}


def _gpt2(path: Path, seq_len: int, shape: dict[str, int]) -> Path:
    path.write_text(json.dumps({"model_type": "gpt2", "n_positions": seq_len, **shape}))
    return path


def _done(path: Path, name: str) -> bool:
    return (path / name).is_file()


def capture_stats(cache: Path) -> dict[str, Any]:
    """Stored target bytes per training token, the capture's tokens/s, and (sampled) unique ids per position."""
    import numpy as np

    from kdcache.cache.info import describe_cache
    from kdcache.cache.reader import open_cache
    from kdcache.methods.targets import target_kind

    summary = describe_cache(cache)
    train = open_cache(cache, "train")
    lengths = train.read("lengths")
    tokens = int(lengths.sum())
    stats = {"bytes_per_token": summary["splits"][0]["logits_bytes_stored"] / tokens,
             "tokens_per_second": tokens / summary["throughput"]["train"]["seconds"]}
    if target_kind(train) != "sampled":
        return stats
    counts = train.read("sampled_counts")
    real = np.arange(counts.shape[1])[None, :] < lengths[:, None]
    stats["unique_ids"] = float((counts > 0).sum(-1)[real].mean())
    return stats


def lm(kd: Runner, scale: str, seeds: int, first_seed: int = 0, corpus: Path | None = None,
       reuse: bool = False, arms: tuple[str, ...] | None = None) -> str:
    """Corpus -> BPE and teacher -> four caches -> every arm (or `arms`), seed by seed."""
    s = LM_SCALES[scale]
    work = kd.out
    lines = split_corpus(corpus or DATA / "tinyshakespeare" / "input.txt", work / "data", s["lines"])
    common = ["--data", work / "data", "--seq-len", s["seq_len"]]
    teacher = work / "teacher"
    teacher_seconds = None
    if not (reuse and _done(teacher, "summary.json")):
        teacher_seconds = kd("train", "--task", "lm", "--model", _gpt2(work / "teacher.json", s["seq_len"],
                             s["teacher"]), "--vocab-size", s["vocab"], *common, "--lr", 1e-3, "--epochs",
                             s["teacher_epochs"], "--batch-size", 32, "--seed", 0, "--out", teacher, "--no-progress",
                             "--overwrite")
    caches, stats = {}, {}
    for name, flags in CAPTURES.items():
        caches[name] = work / f"{name}.kdcache"
        flags = [s["draws"] if f is None else f for f in flags]
        if name == "top32":
            flags = [*flags, "--hidden-layers", s["hidden"], "--proj-dim", s["proj_dim"]]
        if not (reuse and _done(caches[name], "zarr.json")):
            kd("cache-teacher", "--task", "lm", "--teacher", teacher / "model", *common, "--split", "train", "--split",
               "validation", *flags, "--batch-size", 32, "--out", caches[name], "--device", kd.device, "--no-progress",
               "--overwrite")
        stats[name] = capture_stats(caches[name])
    from bench_lm_capture import bare_forward

    bare = statistics.median(bare_forward(teacher / "model", work / "data" / "train.txt", s["seq_len"], 32)
                             for _ in range(3))
    student = _gpt2(work / "student.json", s["seq_len"], s["student"])
    hp = ["--epochs", s["epochs"], "--batch-size", s["batch"], "--lr", s["lr"]]
    results = []
    with open(work / "results.csv", "w", newline="") as f:
        csv.writer(f).writerow(RESULT_COLUMNS)
    for seed in range(first_seed, first_seed + seeds):
        for arm in arms or ("train-ce", *ARMS):
            run = work / f"{arm}-seed{seed}"
            if arm == "train-ce":
                seconds = kd("train", "--task", "lm", "--model", student, "--tokenizer", teacher / "model", *common,
                             *hp, "--seed", seed, "--out", run, "--no-progress", "--overwrite")
                epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                best, last = min(e["val_perplexity"] for e in epochs), epochs[-1]["val_perplexity"]
                extra = {"tokens_per_second": statistics.fmean(e["tokens_per_second"] for e in epochs)}
            else:
                cache, flags = ARMS[arm]
                if arm == "curriculum":
                    flags = [*flags, "--phase-epochs", s["phases"]]
                seconds = kd("distill", "--cache", caches[cache], "--student", student, *flags, *hp, "--seed", seed,
                             "--out", run, "--device", kd.device, "--no-progress", "--overwrite")
                summary = kd.summary(run)
                best, last = summary["best_metric"], summary["last_metric"]
                extra = {"tokens_per_second": summary["tokens_per_second"], "agreement": summary["best_agreement"]}
            results.append(Result(arm, seed, best, last, seconds, "perplexity", extra=extra))
            with open(work / "results.csv", "a", newline="") as f:
                csv.writer(f).writerow(_row(results[-1]))
            print(f"  {arm:18s} seed {seed}: best {best:.2f} last {last:.2f} ({seconds:.0f} s)", flush=True)
    with open(work / "speed.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "seed", "tokens_per_second", "agreement"])
        writer.writerows([r.method, r.seed, r.extra["tokens_per_second"], r.extra.get("agreement", "")]
                         for r in results)
    return write_results(work, f"Tiny Shakespeare ({scale} scale): token-level targets for a "
                         f"{s['student']['n_layer']}-layer student", results, _notes(s, lines, stats, bare, results,
                                                                                      teacher, teacher_seconds))


def _notes(s: dict, lines: dict, stats: dict, bare: float, results: list[Result], teacher: Path,
           teacher_seconds: float | None) -> list[str]:
    """The setup, each cache's bytes/token and capture speed against the bare forward's `bare` tokens/s, each arm's
    training tokens/s and agreement."""
    final = json.loads((teacher / "summary.json").read_text())["final"]
    mean = lambda arm, key: statistics.fmean(  # noqa: E731
        r.extra[key] for r in results if r.method == arm and r.extra.get(key) is not None)
    arms = list(dict.fromkeys(r.method for r in results))
    base = mean("train-ce", "tokens_per_second") if "train-ce" in arms else None
    return [
        "Lower is better: a difference below 0 favours the row's method.",
        f"Corpus: {lines['train']:,} training and {lines['validation']:,} validation lines; BPE of {s['vocab']} "
        f"tokens; windows of {s['seq_len']}. Teacher GPT-2 {s['teacher']}, {s['teacher_epochs']} epochs at 1e-3: "
        f"validation perplexity {final['val_perplexity']:.1f}"
        + (f" ({teacher_seconds:.0f} s)." if teacher_seconds else " (reused)."),
        f"Students GPT-2 {s['student']}, {s['epochs']} epochs, batch {s['batch']}, lr {s['lr']} (the lm preset "
        f"otherwise: AdamW, cosine); curriculum phases `--phase-epochs {s['phases']}` over layers {s['hidden']}, "
        f"then the rest on the top-32 targets.",
        "Caches (stored target bytes per token; capture tokens/s, against the bare teacher forward over the same "
        f"windows in batches of 32, {bare:,.0f} tokens/s, the median of 3): " + ", ".join(
            f"{name} {v['bytes_per_token']:.1f} B, {v['tokens_per_second']:,.0f}/s "
            f"({v['tokens_per_second'] / bare:.2f}x)" for name, v in stats.items())
        + (f"; RS-KD: {s['draws']} draws, {stats['sampled']['unique_ids']:.1f} unique ids a position on average."
           if "unique_ids" in stats.get("sampled", {}) else "."),
        "Training tokens/s (mean over seeds; against `train-ce`) and top-1 agreement with the teacher at the best "
        "epoch: " + ", ".join(f"{a} {mean(a, 'tokens_per_second'):,.0f}"
                             + (f" ({mean(a, 'tokens_per_second') / base:.2f}x)" if base else "")
                             + (f", {mean(a, 'agreement'):.3f}" if a != "train-ce" else "") for a in arms) + ".",
    ]


__all__ = ["ARMS", "LM_SCALES", "capture_stats", "lm", "split_corpus"]
