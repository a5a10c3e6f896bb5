"""The noise toy of the Continuation-KD paper (Sec. 6, "Noise Robustness", Fig. 2), with kdcache's own CLI.

    python benchmarks/reproduce.py noise [--scale tiny|cpu|full] [--seeds 3] [--out benchmarks/results/noise-cpu]

The paper: a low-frequency sinusoid plus a high-frequency sinusoidal noise is the (noisy) teacher; 3,000
points are sampled from it; a fully connected student with one input, two hidden layers of 128 and one output
is trained once with Vanilla-KD and once with Continuation-KD; the Continuation-KD student follows the clean
signal and the Vanilla-KD one the noise (a figure, no number). Here, every choice the paper leaves open:

Data (one draw, `numpy.random.default_rng(0)`, the same for every student seed). x ~ U[0, 1]: 3,000 training
points (300 at `tiny`) and 1,000 validation points (100 at `tiny`). Clean signal c(x) = sin(2 pi f x) with
f = 2 (two periods). Two noises, each a separate experiment with its own teacher:
- `sine` (the paper's): n(x) = s sin(2 pi F x), F = 10 (five times the signal's frequency), s = 0.4;
- `gaussian` (i.i.d. label noise): n ~ N(0, s^2), s = 0.4, drawn once per point.
The teacher's output at x is c(x) + n(x). The files are written as task `tabular` (.npz, x (N, 1) float,
y = the teacher's noisy value, so a user's validation score is against noisy targets, as it would be).

Teacher: the noisy function itself, as a model: `noise_toy:table_teacher`, a lookup table of (x, noisy value)
over every point it is asked about (training and validation), returning the value of the nearest tabulated x.
It is saved as a kdcache model folder (architecture `noise_toy:table_teacher`, kwargs {"rows": N}) and read by
`kdcache cache-teacher --teacher DIR` like any teacher; the cache stores float32 logits, so the students see
the noisy values exactly. (A wide MLP trained on the noisy targets would be a second, imperfect fit of the
noise; the table makes "the teacher is the noisy sinusoid" literal.) The kdcache subprocesses get
PYTHONPATH=benchmarks/ (so the factory imports) and OMP_NUM_THREADS=1 unless set (a model this small runs
fastest on one thread; two threads on a busy 2-core machine made every step ten times slower).

Students: `mlp` with in_features 1, hidden 128, depth 2 (1-128-128-1, ReLU), same seed -> same initialisation
and batch order for both methods. AdamW lr 1e-3, no weight decay, batch 64, constant lr (the `small` preset),
400 epochs at `cpu` (long enough that the plain-matching student starts to follow the sine noise; 1,000 at
`full`, 3 at `tiny`):
- `vanilla`: `--method vanilla --alpha 0`: for a one-output regression that is exactly the MSE between the
  student's and the teacher's outputs, i.e. plain logit matching;
- `continuation`: `--method continuation --psi constant:0 --t-max 10 --margin m`: no label term at all (the
  only labels are the same noisy values), the hinge max(0, (z_S - phi z_T)^2 - m phi) per sample, phi rising
  from 1/10 to 1 as T steps down from 10 every n/10 epochs (Algorithm 1; T = 1 for the last tenth of the run).
  Every margin of one seed is a run of one `kdcache sweep --grid margin=...` (the students see the same
  batches, stepped together). Three rows (issue 14): `m=0` (the annealing alone, no margin);
  `m by validation`: of the decades 0.001, 0.01, 0.1, 1 (`MARGIN_GRID`, fixed before any run, nothing about the
  noise's size in them), the m whose last-epoch student has the lowest mean squared error to the NOISY
  validation targets, all a user has; `m=s^2 (oracle)`: m = s^2 = 0.16, chosen knowing the noise's amplitude
  (for the sine noise the tube |z_S - z_T| <= sqrt(m) = s just holds the whole noise; for the Gaussian one it
  is the one-sigma tube). The selection by validation is fair for the Gaussian noise (drawn afresh for each
  validation point, so the clean signal is its best predictor) and biased for the sine noise: that noise is
  a fixed function of x, the same on the validation points, so validation rewards the student that follows
  it, which pushes the pick towards small m. Both are reported, as they come out.

Reported, per seed: each student's RMSE to the CLEAN signal on a dense grid (2,001 points over [0, 1]), for
its best checkpoint (RUN/best, selected by kdcache on validation Pearson against the noisy validation targets:
what a user without the clean signal can do) in the `best` column and for the final epoch (saved with
`--save-every EPOCHS`) in the `last` column; the teacher's RMSE to the clean signal on its training points
is in the notes (the noise level: sqrt(s^2/2) = 0.28 for the sine, about s = 0.4 for the Gaussian). Outputs:
the usual results.csv / summary.csv / summary.md (with per-seed paired comparisons and the selected epochs in
its notes), `summary.png` (one panel per noise: bars = last-epoch RMSE, points = seeds, crosses = best
checkpoints), `noise.png` (the paper's Fig. 2 layout, per noise: the teacher's training points, the clean
signal and the seed-0 students after the last epoch) and `curves.npz` (grid, clean signal, every student's
predictions).

Caveats. Pearson is blind to scale, so for Continuation-KD the `best` column can come from an epoch with
phi < 1, whose outputs are shrunk towards phi z_T (seen at `cpu` scale on the Gaussian noise: best epochs 157-345
of 400, RMSE up to 0.44): read the `last` column for those rows. F, the epoch count and m were fixed after a
one-seed pilot (outside this harness) that measured RMSE to the clean signal: at F = 25 neither student had
learnt any of the noise after 300 epochs (an MLP learns high frequencies last), so the comparison would show
nothing; F = 10 lets plain matching pick the noise up within 400 epochs.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from reproduce import Result, Runner, paired_table, write_results

BENCHMARKS = Path(__file__).resolve().parent
SIGNAL_FREQUENCY = 2.0  # f: periods of the clean signal over [0, 1]
NOISE_FREQUENCY = 10.0  # F: periods of the sinusoidal noise over [0, 1]
NOISE_SCALE = 0.4  # s: the sine noise's amplitude, the Gaussian noise's standard deviation
GRID = 2001
METRIC = "rmse to clean signal (lower is better)"
STUDENT_KWARGS = {"in_features": 1, "hidden": 128, "depth": 2}

#: Issue 14: the margin a user without the clean signal can choose: decades, fixed before any run (nothing about
#: the noise's size went into them), picked per seed by the last epoch's mean squared error to the NOISY
#: validation targets. Beside it, m = 0 (the annealing alone) and the oracle m = s^2 (chosen knowing the noise).
MARGIN_GRID = {"tiny": (0.1,), "cpu": (0.001, 0.01, 0.1, 1.0), "full": (0.001, 0.01, 0.1, 1.0)}
ORACLE_MARGIN = round(NOISE_SCALE ** 2, 6)  # m = s^2, chosen knowing the noise (0.4 ** 2 is 0.16000000000000003)
ROWS = ("vanilla", "continuation m=0", "continuation m by validation", "continuation m=s^2 (oracle)")

NOISE_SCALES = {
    "tiny": {"train": 300, "validation": 100, "epochs": 3, "noises": ("sine",)},
    "cpu": {"train": 3000, "validation": 1000, "epochs": 400, "noises": ("sine", "gaussian")},
    "full": {"train": 3000, "validation": 1000, "epochs": 1000, "noises": ("sine", "gaussian")},
}


# --- the teacher: the noisy function as a lookup table --------------------------------------------------------

class TableTeacher(nn.Module):
    """f(x) = the tabulated value at the tabulated x nearest to x: a noisy function sampled at given points."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.register_buffer("x", torch.zeros(rows))
        self.register_buffer("y", torch.zeros(rows))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        query = inputs.reshape(len(inputs), -1)[:, :1].to(self.x.dtype)
        nearest = (query - self.x[None, :]).abs().argmin(dim=1)
        return self.y[nearest][:, None]


def table_teacher(num_classes: int = 1, rows: int = 1) -> nn.Module:
    """Factory for `noise_toy:table_teacher` (one output: a regression teacher)."""
    if num_classes != 1:
        raise ValueError(f"the noise toy's teacher has one output, not {num_classes}")
    return TableTeacher(rows)


# --- data ------------------------------------------------------------------------------------------------------

def clean_signal(x: np.ndarray) -> np.ndarray:
    return np.sin(2 * np.pi * SIGNAL_FREQUENCY * x)


def make_data(noise: str, n_train: int, n_val: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (x, noisy teacher value)}; one fixed draw per noise kind."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("validation", n_val)):
        x = rng.uniform(0.0, 1.0, n)
        if noise == "sine":
            eps = NOISE_SCALE * np.sin(2 * np.pi * NOISE_FREQUENCY * x)
        elif noise == "gaussian":
            eps = rng.normal(0.0, NOISE_SCALE, n)
        else:
            raise ValueError(f"unknown noise {noise!r}")
        out[split] = (x, clean_signal(x) + eps)
    return out


def write_task(folder: Path, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """The data as task `tabular`: FOLDER/{train,validation}.npz with x (N, 1) float32 and y (N,) float32."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in data.items():
        np.savez(folder / f"{split}.npz", x=x.astype(np.float32)[:, None], y=y.astype(np.float32))
    return folder


def write_teacher(folder: Path, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """The table teacher over every split's points, as a kdcache model folder `cache-teacher --teacher` loads."""
    from kdcache.models.teachers import save_model_dir

    x = np.concatenate([d[0] for d in data.values()]).astype(np.float32)
    y = np.concatenate([d[1] for d in data.values()]).astype(np.float32)
    model = TableTeacher(len(x))
    model.x.copy_(torch.from_numpy(x))
    model.y.copy_(torch.from_numpy(y))
    return save_model_dir(model, folder, architecture="noise_toy:table_teacher", num_classes=1,
                          kwargs={"rows": len(x)})


@contextlib.contextmanager
def _subprocess_env() -> Iterator[None]:
    """For the kdcache subprocesses started meanwhile: PYTHONPATH += benchmarks/ (cache-teacher imports
    noise_toy) and, unless set already, OMP_NUM_THREADS=1: a 1-128-128-1 MLP on batches of 64 gains nothing
    from several threads, and on a busy 2-core machine two threads made each step ten times slower."""
    before = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(BENCHMARKS), *filter(None, [before["PYTHONPATH"]])])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pick_margin(val_mse: dict[float, float]) -> float:
    """The grid's margin whose student fits the noisy validation targets best (lowest MSE; the smaller m on a
    tie): what a user who has only those targets can choose."""
    return min(sorted(val_mse), key=lambda m: val_mse[m])


# --- evaluation --------------------------------------------------------------------------------------------------

def predict(model_dir: Path, grid: np.ndarray) -> np.ndarray:
    from kdcache.models.teachers import load_teacher

    teacher = load_teacher(str(model_dir), trust_model_code=True)  # the table teacher is this file's own code
    with torch.inference_mode():
        return teacher(torch.from_numpy(grid.astype(np.float32)[:, None]))[:, 0].double().numpy()


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


# --- the experiment ------------------------------------------------------------------------------------------------

def noise(kd: Runner, scale: str, seeds: int) -> str:
    """Per noise kind: data -> table teacher -> cache-teacher -> one student per method and seed -> RMSE to clean."""
    s = NOISE_SCALES[scale]
    work, n = kd.out, s["epochs"]
    grid = np.linspace(0.0, 1.0, GRID)
    clean = clean_signal(grid)
    results: list[Result] = []
    curves: dict[str, np.ndarray] = {"grid": grid, "clean": clean}
    teachers: dict[str, dict[str, Any]] = {}
    common = ["--student", "mlp", "--student-kwargs", json.dumps(STUDENT_KWARGS), "--epochs", n, "--lr", "1e-3",
              "--batch-size", 64, "--optimizer", "adamw", "--weight-decay", 0, "--lr-schedule", "constant",
              "--save-every", n, "--device", kd.device, "--no-progress", "--overwrite"]
    margins = sorted({0.0, *MARGIN_GRID[scale], ORACLE_MARGIN})
    continuation = ["--method", "continuation", "--psi", "constant:0", "--t-max", 10]
    chosen: dict[str, list[float]] = {}
    by_margin: dict[tuple[str, float], list[float]] = {}
    for kind in s["noises"]:
        root = work / kind
        data = make_data(kind, s["train"], s["validation"])
        task = write_task(root / "data", data)
        teacher_dir = write_teacher(root / "teacher", data)
        x_train, y_train = data["train"]
        teachers[kind] = {"x": x_train, "y": y_train, "rmse": rmse(y_train, clean_signal(x_train))}
        cache = root / "teacher.kdcache"
        kd.log.write(f"# {kind} noise: data and teacher written by benchmarks/noise_toy.py; commands below ran "
                     "with PYTHONPATH=benchmarks (the teacher's factory) and OMP_NUM_THREADS=1\n")
        with _subprocess_env():
            cache_seconds = kd("cache-teacher", "--teacher", teacher_dir, "--task", "tabular", "--data", task,
                               "--split", "train", "--split", "validation", "--dtype", "float32", "--out", cache,
                               "--device", kd.device, "--no-progress", "--overwrite", "--trust-model-code")
        teachers[kind]["cache_seconds"] = cache_seconds
        print(f"{kind} noise: teacher RMSE to the clean signal {teachers[kind]['rmse']:.4f} "
              f"(cache-teacher {cache_seconds:.0f} s)", flush=True)
        x_val, y_val = data["validation"]

        def student(method: str, seed: int, run: Path, seconds: float) -> tuple[Result, float]:
            """The run's row, and its last epoch's mean squared error to the noisy validation targets."""
            summary = kd.summary(run)
            best = predict(run / "best", grid)
            last, val = np.split(predict(run / "checkpoints" / f"epoch-{n:04d}", np.concatenate([grid, x_val])),
                                 [len(grid)])  # the last epoch's student loaded once for both
            curves[f"{kind}/{method}/seed{seed}/best"], curves[f"{kind}/{method}/seed{seed}/last"] = best, last
            val_mse = float(np.mean((val - y_val) ** 2))
            return Result(f"{method} [{kind}]", seed, rmse(best, clean), rmse(last, clean), seconds, METRIC,
                          {"best_epoch": summary["best_epoch"], "val_pearson": summary["best_metric"],
                           "val_mse": val_mse}), val_mse

        for seed in range(seeds):
            sweep_dir = root / f"continuation-seed{seed}"
            with _subprocess_env():  # vanilla, then every margin in one `kdcache sweep` (students stepped together)
                alone = kd("distill", "--cache", cache, *common, "--method", "vanilla", "--alpha", 0, "--seed",
                           seed, "--out", root / f"vanilla-seed{seed}")
                seconds = kd("sweep", "--cache", cache, *common, *continuation, "--grid",
                             "margin=" + ",".join(f"{m:g}" for m in margins), "--seeds", seed, "--out", sweep_dir)
            rows = {"vanilla": student("vanilla", seed, root / f"vanilla-seed{seed}", alone)[0]}
            grid_rows = {}
            for m in margins:
                run = sweep_dir / f"margin-{float(m)}_seed-{seed}"
                grid_rows[m] = student(f"continuation m={m:g}", seed, run, seconds / len(margins))
                by_margin.setdefault((kind, m), []).append(grid_rows[m][0].last)
            pick = pick_margin({m: grid_rows[m][1] for m in MARGIN_GRID[scale]})
            chosen.setdefault(kind, []).append(pick)
            for name, m in (("continuation m=0", 0.0), ("continuation m by validation", pick),
                            ("continuation m=s^2 (oracle)", ORACLE_MARGIN)):
                r = grid_rows[m][0]
                rows[name] = Result(f"{name} [{kind}]", seed, r.best, r.last, r.seconds, METRIC,
                                    {**r.extra, "margin": m})
                for end in ("best", "last"):
                    curves[f"{kind}/{name}/seed{seed}/{end}"] = curves[f"{kind}/continuation m={m:g}/seed{seed}/{end}"]
            for r in rows.values():
                results.append(r)
                print(f"  {r.method:46s} seed {seed}: rmse best {r.best:.4f} (epoch {r.extra['best_epoch']}) "
                      f"last {r.last:.4f} ({r.seconds:.0f} s)", flush=True)
    np.savez(work / "curves.npz", **{k.replace("/", "__"): v for k, v in curves.items()})
    _figure(work / "noise.png", grid, clean, teachers, curves, ["vanilla", "continuation m by validation"], n)
    notes = _notes(scale, teachers, margins, chosen, by_margin, results, seeds)
    title = f"Noise toy ({scale} scale): students of a noisy sinusoid teacher"
    text = write_results(work, title, results, notes)
    _summary_chart(work / "summary.png", title, results)
    return text


def _notes(scale: str, teachers: dict[str, dict[str, Any]], margins: list[float], chosen: dict[str, list[float]],
           by_margin: dict[tuple[str, float], list[float]], results: list[Result], seeds: int) -> list[str]:
    """summary.md's notes: the data, the students, the margins picked and every margin's result, the pairings."""
    s, n, oracle = NOISE_SCALES[scale], NOISE_SCALES[scale]["epochs"], ORACLE_MARGIN
    return [
        "Teacher RMSE to the clean signal (its training points): "
        + "; ".join(f"{k} noise {v['rmse']:.4f}" for k, v in teachers.items()) + ".",
        f"Data: clean sin(2 pi {SIGNAL_FREQUENCY:g} x), x ~ U[0, 1]; {s['train']} training and {s['validation']} "
        f"validation points; noise `sine` = {NOISE_SCALE} sin(2 pi {NOISE_FREQUENCY:g} x) (the paper's kind), "
        f"`gaussian` = N(0, {NOISE_SCALE}^2) per point. Teacher: the noisy values as a lookup table "
        "(`noise_toy:table_teacher`), cached as float32.",
        f"Students: mlp 1-128-128-1, AdamW lr 1e-3, batch 64, {n} epochs. vanilla = `--method vanilla --alpha 0` "
        "(MSE to the teacher's outputs); continuation = `--method continuation --psi constant:0 --t-max 10 "
        "--margin m`, every m of one seed in one `kdcache sweep --grid "
        f"margin={','.join(f'{m:g}' for m in margins)}`. "
        f"m by validation: of the grid {', '.join(f'{m:g}' for m in MARGIN_GRID[scale])} (decades, fixed in "
        "advance), the m whose last-epoch student has the lowest mean squared error to the noisy validation "
        f"targets (all a user has); m = 0: the annealing alone; oracle m = s^2 = {oracle:g}, chosen knowing the "
        "noise's amplitude.",
        "Margins chosen by validation, per seed: " + "; ".join(
            f"{k} noise {', '.join(f'{m:g}' for m in v)}" for k, v in chosen.items()) + ".",
        "Last-epoch RMSE to the clean signal by margin (mean over seeds): " + "; ".join(
            f"{k} noise " + ", ".join(f"m={m:g} {np.mean(by_margin[(k, m)]):.4f}" for m in margins)
            for k in s["noises"]) + ".",
        "best = RMSE on a 2,001-point grid of the checkpoint kdcache selected on validation Pearson against the "
        "noisy validation targets; last = the final epoch's student. Lower is better. Pearson is blind to scale, "
        "so it can select a Continuation-KD checkpoint from while phi < 1 (outputs near phi z_T, too small): "
        "read the last-epoch column for the continuation rows.",
        "Selected best epochs: " + "; ".join(
            f"{m} {', '.join(str(r.extra['best_epoch']) for r in results if r.method == m)}"
            for m in dict.fromkeys(r.method for r in results)) + ".",
        *_paired(results, seeds),
        "", *paired_table(results, "last"),
    ]


def _paired(results: list[Result], seeds: int) -> list[str]:
    """Per noise and continuation variant: on how many seeds its last-epoch student beats vanilla's (same seed)."""
    lines = []
    by = {(r.method, r.seed): r for r in results}
    for method in dict.fromkeys(r.method for r in results):
        if method.startswith("vanilla"):
            continue
        kind = method[method.index("["):]
        pairs = [(by[(method, k)].last, by[(f"vanilla {kind}", k)].last) for k in range(seeds)
                 if (method, k) in by and (f"vanilla {kind}", k) in by]
        if pairs:
            wins = sum(c < v for c, v in pairs)
            mean = sum(c - v for c, v in pairs) / len(pairs)
            lines.append(f"Paired by seed, last epoch: {method} beats vanilla {kind} on {wins} of {len(pairs)} seeds "
                         f"(mean difference {mean:+.4f}).")
    return lines


def _summary_chart(path: Path, title: str, results: list[Result]) -> None:
    """One panel per noise: bars = last-epoch RMSE (mean +- std over seeds), dots = seeds, x = best checkpoint."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    kinds = list(dict.fromkeys(r.method[r.method.index("[") + 1:-1] for r in results))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        methods = [m for m in dict.fromkeys(r.method for r in results) if m.endswith(f"[{kind}]")]
        names = [m[: m.index("[")].strip() for m in methods]
        for i, method in enumerate(methods):
            last = np.array([r.last for r in results if r.method == method])
            best = np.array([r.best for r in results if r.method == method])
            ax.bar(i, last.mean(), yerr=last.std(ddof=1) if len(last) > 1 else 0, capsize=4, color="#4c72b0",
                   label="last epoch (mean ± std)" if i == 0 else None)
            ax.scatter(np.full(len(last), i), last, color="black", s=10, zorder=3,
                       label="last epoch, per seed" if i == 0 else None)
            ax.scatter(np.full(len(best), i + 0.25), best, color="#dd8452", marker="x", s=25, zorder=3,
                       label="best checkpoint, per seed" if i == 0 else None)
        ax.set_xticks(range(len(methods)), names, fontsize=8)
        ax.set_title(f"{kind} noise", fontsize=9)
        ax.set_ylabel(METRIC, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _figure(path: Path, grid: np.ndarray, clean: np.ndarray, teachers: dict[str, dict[str, Any]],
            curves: dict[str, np.ndarray], methods: list[str], epochs: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shown = methods
    kinds = list(teachers)
    fig, axes = plt.subplots(len(kinds), len(shown), figsize=(5 * len(shown), 3.2 * len(kinds)), squeeze=False,
                             sharey=True)
    for i, kind in enumerate(kinds):
        t = teachers[kind]
        for j, method in enumerate(shown):
            ax = axes[i][j]
            key = f"{kind}/{method}/seed0/last"
            ax.scatter(t["x"], t["y"], s=2, color="#4c72b0", alpha=0.35, label="teacher (noisy) points")
            ax.plot(grid, clean, "k--", lw=1.2, label="clean signal")
            if key in curves:
                ax.plot(grid, curves[key], color="#dd8452", lw=2,
                        label=f"student, rmse {rmse(curves[key], clean):.3f}")
            label = ("plain logit matching (vanilla, alpha 0)" if method == "vanilla"
                     else f"Continuation-KD (psi 0), {method[len('continuation '):]}")
            ax.set_title(f"{kind} noise: {label}", fontsize=9)
            ax.set_xlabel("x")
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Noise toy: 1-128-128-1 MLP students after {epochs} epochs (seed 0); rmse to the clean signal",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["noise", "pick_margin", "table_teacher", "TableTeacher", "make_data", "clean_signal", "NOISE_SCALES"]
