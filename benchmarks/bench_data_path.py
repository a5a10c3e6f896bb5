"""The student's data path (issue 12): start-up against dataset size, an ImageNet-shaped run, distill vs train
throughput, and the classes in a batch of a class-sorted split under each shuffle mode.

    python benchmarks/bench_data_path.py startup --rows 5000 50000        # synthetic CIFAR-10 pickles
    python benchmarks/bench_data_path.py imagenet --unique 4000            # 1.28M rows, 1000 classes, 224 px
    python benchmarks/bench_data_path.py throughput                        # digits MLP, ResNet-8, BERT-2L
    python benchmarks/bench_data_path.py classes                           # classes per batch, per mode
    python benchmarks/bench_data_path.py kdloss                            # the KD loss's own cost, MLP step

Every run is the public CLI in a subprocess, as a user runs it; start-up is `summary.json`'s `startup_seconds`
(process start to the first optimizer step) and peak memory the subprocess's own maximum RSS (and its
DataLoader workers' largest, reported apart). `--out FILE` appends the table as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KDCACHE_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

_WRAPPER = """
import json, resource, sys
from kdcache.cli.main import main
sys.argv = ["kdcache", *sys.argv[2:]]
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
usage = {"self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
         "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "code": code}
open(__import__("os").environ["KD_USAGE"], "w").write(json.dumps(usage))
"""


def _rss_mb(pid: int) -> float:
    line = [ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS")][0]
    return int(line.split()[1]) / 1024


def _tree_pss_mb(pid: int) -> float:
    """Proportional set size of a process and its descendants: shared pages (a forked worker's view of the
    parent's arrays) counted once, so the sum is the memory the run really holds."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
            total += int([ln for ln in rollup if ln.startswith("Pss:")][0].split()[1]) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError):
            continue
    return total


def kd(*args: object, env: dict | None = None, sample_rss: bool = False) -> dict:
    """Run `kdcache ARGS` in a fresh process; wall seconds, peak RSS, and (sample_rss) RSS every 0.5 s."""
    with tempfile.NamedTemporaryFile(suffix=".json") as usage:
        environ = {**os.environ, **(env or {}), "KD_USAGE": usage.name, "PYTHONPATH": str(REPO)}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, "-", *map(str, args)], env=environ,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        samples: list[tuple[float, float]] = []
        if sample_rss:
            def watch() -> None:
                while proc.poll() is None:
                    try:
                        samples.append((time.perf_counter() - start, _rss_mb(proc.pid), _tree_pss_mb(proc.pid)))
                    except (OSError, IndexError, ValueError):
                        pass
                    time.sleep(0.5)
            threading.Thread(target=watch, daemon=True).start()
        out, err = proc.communicate()
        wall = time.perf_counter() - start
        result = json.loads(Path(usage.name).read_text() or "{}")
    if proc.returncode or result.get("code"):
        raise SystemExit(f"kdcache {' '.join(map(str, args))} failed:\n{err[-3000:]}")
    return {"wall": wall, **result, "samples": samples}


def _table(title: str, header: list[str], rows: list[list[object]], out: Path | None, note: str = "") -> None:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines + ([""] + [note] if note else []) + [""])
    print(text)
    if out is not None:
        with open(out, "a") as f:
            f.write(text + "\n")


# ---------------------------------------------------------------------------------------------- start-up

def write_cifar(folder: Path, rows: int, test_rows: int = 1000, seed: int = 0) -> Path:
    """CIFAR-10 as distributed (python pickles), random pixels: five train batches of rows/5 and one test batch.
    Protocol 4 stores the pixels as raw bytes, as the Python 2 pickles of the real files do."""
    rng = np.random.default_rng(seed)
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    per = rows // 5
    for k in range(5):
        n = per if k < 4 else rows - 4 * per
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (root / f"data_batch_{k + 1}").write_bytes(pickle.dumps(batch, protocol=4))
    test = {b"data": rng.integers(0, 256, (test_rows, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, test_rows))}
    (root / "test_batch").write_bytes(pickle.dumps(test, protocol=4))
    names = [f"class{k}".encode() for k in range(10)]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return folder


def resnet_teacher(folder: Path, in_channels: int = 3) -> Path:
    import torch

    from kdcache.models import build_model, save_model_dir

    torch.manual_seed(0)
    kwargs = {} if in_channels == 3 else {"in_channels": in_channels}
    return save_model_dir(build_model("resnet8", 10, **kwargs), folder, architecture="resnet8", num_classes=10,
                          kwargs=kwargs)


def startup(args: argparse.Namespace) -> None:
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = resnet_teacher(tmp / "teacher")
        for n in args.rows:
            data = write_cifar(tmp / f"cifar-{n}", n)
            cache = tmp / f"c{n}.kdcache"
            kd("cache-teacher", "--teacher", teacher, "--task", "cifar10", "--data", data, "--split", "train",
               "--split", "test", "--out", cache, "--device", "cpu", "--batch-size", "500", "--no-progress")
            for check_first in (False, True):
                starts, peaks, workers = [], [], []
                for repeat in range(args.repeats):
                    run = tmp / f"run-{n}-{check_first}-{repeat}"
                    res = kd("distill", "--cache", cache, "--student", "resnet8", "--method", "vanilla", "--epochs",
                             "1", "--max-steps", "5", "--batch-size", "128", "--out", run, "--device", "cpu",
                             "--no-progress", *(["--check-first"] if check_first else []))
                    starts.append(json.loads((run / "summary.json").read_text())["startup_seconds"])
                    peaks.append(res["self_mb"])
                    workers.append(res["children_mb"])
                rows_out.append([f"{n:,}", "--check-first" if check_first else "checked as decoded",
                                 f"{statistics.median(starts):.2f}", f"{max(peaks):.0f}", f"{max(workers):.0f}"])
    _table("Start-up against dataset size (synthetic CIFAR-10 pickles, ResNet-8 student, CPU)",
           ["train rows", "row checks", "startup_seconds (median)", "peak RSS MB", "worker peak RSS MB"],
           rows_out, args.out, f"{args.repeats} runs each; `distill --method vanilla --max-steps 5 --batch-size 128`.")


# ---------------------------------------------------------------------------------------------- ImageNet-shaped

def _smooth_image(rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """A photograph-sized image that compresses like one (gradients and a few blobs, not noise)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([a * x + b * y + c for a, b, c in rng.uniform(-120, 120, (3, 3))], -1) + 128
    for _ in range(4):
        cy, cx, r = rng.uniform(0, 1, 3)
        mask = ((y - cy) ** 2 + (x - cx) ** 2) < (0.05 + 0.2 * r) ** 2
        img[mask] += rng.uniform(-80, 80, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_imagenet(root: Path, unique: int, classes: int = 1000, per_class: int = 1280, val_per_class: int = 1) -> None:
    """torchvision's ImageNet layout: train/<wnid>/<wnid>_<j>.JPEG for classes x per_class rows, val likewise;
    row r of a split is a hard link to unique image r % unique (the disk holds `unique` images)."""
    from PIL import Image

    pool = root / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(unique):
        path = pool / f"{k:06d}.JPEG"
        if not path.exists():
            Image.fromarray(_smooth_image(rng)).save(path, quality=90)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                target = folder / f"n{c:08d}_{j:05d}.JPEG"
                if not target.exists():
                    os.link(pool / f"{(c * n + j) % unique:06d}.JPEG", target)


def tiny_imagenet_teacher(num_classes: int = 1000):
    """A teacher that costs almost nothing per 224 px image: pooled colour means -> linear (only the cache's
    size and shape matter here)."""
    import torch

    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, num_classes))


def cache_imagenet(root: Path, out: Path) -> None:
    """`cache-teacher` over the ImageNet-shaped tree, each distinct image decoded once (rows are hard links, so
    the decoded pixels of a row are those of its inode); everything else is the recipe as users run it."""
    import torch

    import kdcache.data.images as images
    from kdcache.models import save_model_dir
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher

    decoded: dict[int, dict] = {}
    plain = images._FileImages.__getitem__

    def by_inode(self, i: int) -> dict:
        inode = os.stat(self.root / self.members[i]).st_ino
        if inode not in decoded:
            decoded[inode] = plain(self, i)
        item = dict(decoded[inode])
        item["label"], item["index"] = int(self.labels[i]), int(i)
        return item

    images._FileImages.__getitem__ = by_inode
    torch.manual_seed(0)
    teacher = save_model_dir(tiny_imagenet_teacher(), root / "teacher", architecture="bench_data_path:tiny_imagenet_teacher",
                             num_classes=1000, kwargs={})
    cache_teacher(CacheTeacherConfig(teacher=str(teacher), task="imagenet", data=str(root), out=out,
                                     splits=("train", "validation"), device="cpu", batch_size=512, workers=1,
                                     trust_model_code=True, progress=True))


def imagenet(args: argparse.Namespace) -> None:
    root = Path(args.workdir)
    cache = root / "imagenet.kdcache"
    t0 = time.perf_counter()
    write_imagenet(root, args.unique, per_class=args.per_class)
    print(f"tree written in {time.perf_counter() - t0:.0f} s", flush=True)
    if not (cache / "zarr.json").exists() or '"complete": true' not in (cache / "zarr.json").read_text():
        t0 = time.perf_counter()
        cache_imagenet(root, cache)
        print(f"cache written in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.build_only:
        return
    rows_out = []
    for label, flags in (("memory (default budget)", []), ("chunks (--memory-budget 512MiB)",
                                                           ["--memory-budget", "512MiB"])):
        run = root / f"run-{label.split()[0]}"
        res = kd("distill", "--cache", cache, "--student", "resnet8", "--method", "vanilla", "--epochs", "1",
                 "--max-steps", str(args.steps), "--batch-size", "64", "--out", run, "--device", "cpu",
                 "--no-progress", "--overwrite", *flags, sample_rss=True)
        summary = json.loads((run / "summary.json").read_text())
        start, end = summary["startup_seconds"], summary["startup_seconds"] + summary["train_seconds"]
        # the training steps only: after the first step's warm-up, before the evaluation and the exit
        during = [s for s in res["samples"] if start + 5 <= s[0] <= end]
        quarter = max(1, len(during) // 4)

        def median(col: int, part: list) -> str:
            return f"{statistics.median(s[col] for s in part):.0f}" if part else "n/a"

        rows_out.append([label, f"{start:.1f}", f"{res['wall']:.0f}",
                         f"{median(1, during[:quarter])} / {median(1, during[-quarter:])}",
                         f"{median(2, during[:quarter])} / {median(2, during[-quarter:])}",
                         f"{res['self_mb']:.0f}", summary["samples_per_second"]])
    _table(f"ImageNet-shaped run: {1000 * args.per_class:,} train rows, 1000 classes, 224 px ({args.unique:,} distinct JPEGs, "
           "hard-linked cyclically), CPU", ["teacher targets", "startup_seconds", "wall s",
                                            "main RSS MB, first / last quarter of the steps",
                                            "run's PSS MB (main + workers), first / last quarter", "peak RSS MB",
                                            "samples/s"],
           rows_out, args.out, f"`distill --student resnet8 --method vanilla --max-steps {args.steps} --batch-size 64`;"
           " the run then evaluates once on the 1000-row val split. RSS counts a forked worker's shared view of the "
           "parent's arrays again; PSS (from /proc/PID/smaps_rollup, summed over the process tree) counts it once.")


# ---------------------------------------------------------------------------------------------- throughput

def throughput(args: argparse.Namespace) -> None:
    import torch

    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        setups = []
        # digits MLP: the demo's teacher and cache.
        from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
        from kdcache.recipes.demo import train_digits_teacher

        train_digits_teacher(tmp / "digits-teacher", epochs=3)
        digits = cache_teacher(CacheTeacherConfig(teacher=str(tmp / "digits-teacher"), task="digits",
                                                  out=tmp / "digits.kdcache", splits=("train", "validation"),
                                                  device="cpu", progress=False))
        setups.append(("digits MLP", digits, ["--task", "digits"], ["--student", "mlp"], ["--model", "mlp"],
                       ["--epochs", "30", "--batch-size", "64"]))
        # ResNet-8 on synthetic CIFAR-10 (5,000 rows).
        data = write_cifar(tmp / "cifar", 5000)
        teacher = resnet_teacher(tmp / "resnet-teacher")
        cifar = tmp / "cifar.kdcache"
        kd("cache-teacher", "--teacher", teacher, "--task", "cifar10", "--data", data, "--split", "train",
           "--split", "test", "--out", cifar, "--device", "cpu", "--no-progress")
        setups.append(("ResNet-8, CIFAR-10 5k", cifar, ["--task", "cifar10", "--data", data],
                       ["--student", "resnet8"], ["--model", "resnet8"], ["--epochs", "2", "--batch-size", "128"]))
        # BERT-2L on real SST-2 (first 4,000 rows), tiny WordPiece tokenizer.
        from teachers_for_tests import make_tiny_tokenizer
        from transformers import BertConfig, BertForSequenceClassification

        tok = make_tiny_tokenizer(tmp / "tok")
        config = BertConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=256, num_labels=2)
        torch.manual_seed(0)
        bert = BertForSequenceClassification(config)
        bert.save_pretrained(tmp / "bert-teacher")
        tok.save_pretrained(tmp / "bert-teacher")
        (tmp / "bert2.json").write_text(json.dumps({"model_type": "bert", **{k: getattr(config, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}}))
        sst2 = tmp / "sst2.kdcache"
        kd("cache-teacher", "--teacher", tmp / "bert-teacher", "--task", "sst2", "--data", SHARED / "glue" / "SST-2",
           "--split", "train", "--split", "validation", "--limit", "4000", "--out", sst2, "--device", "cpu",
           "--no-progress")
        setups.append(("BERT-2L, SST-2 4k", sst2, ["--task", "sst2", "--data", SHARED / "glue" / "SST-2", "--limit",
                                                    "4000", "--tokenizer", tmp / "bert-teacher"],
                       ["--student", tmp / "bert2.json"], ["--model", tmp / "bert2.json"],
                       ["--epochs", "1", "--batch-size", "32"]))
        for name, cache, task_flags, student, model, hp in setups:
            rates: dict[str, list[float]] = {}
            for repeat in range(args.repeats):
                for method in ("train", "ce", "vanilla", "continuation"):
                    run = tmp / f"run-{name[:5]}-{method}-{repeat}"
                    common = [*hp, "--out", run, "--device", "cpu", "--no-progress", "--seed", str(repeat)]
                    if method == "train":
                        kd("train", *model, *task_flags, *common)
                    else:
                        kd("distill", "--cache", cache, *student, "--method", method, *common)
                    rates.setdefault(method, []).append(json.loads((run / "summary.json").read_text())
                                                        ["samples_per_second"])
            base = statistics.median(rates["train"])
            rows_out.append([name, f"{base:,.0f}", *(f"{statistics.median(rates[m]):,.0f} "
                                                     f"({statistics.median(rates[m]) / base:.2f}x)"
                                                     for m in ("ce", "vanilla", "continuation"))])
    _table("distill vs train: training samples/s (evaluation excluded), CPU",
           ["setting", "train", "distill ce", "distill vanilla", "distill continuation"], rows_out, args.out,
           f"Median of {args.repeats} runs each, alternating; the ratio is to `train` of the same student.")


def kdloss(args: argparse.Namespace) -> None:
    """What the KD loss itself costs a small student's step: the digits MLP, a batch of 64, AdamW, alternating."""
    import torch

    from kdcache.methods.losses import ce, vanilla_kd_loss
    from kdcache.models import mlp

    torch.manual_seed(0)
    model = mlp(10, 64, 256, 2)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y, t = torch.randn(64, 64), torch.randint(0, 10, (64,)), torch.randn(64, 10)

    def step(kd: bool) -> None:
        out = model(x)
        loss = vanilla_kd_loss(out, t, y, temperature=4.0, alpha=0.5) if kd else ce(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times: dict[bool, list[float]] = {False: [], True: []}
    for kd in (False, True) * args.repeats:
        for _ in range(200):
            step(kd)
        start = time.perf_counter()
        for _ in range(2000):
            step(kd)
        times[kd].append((time.perf_counter() - start) / 2000 * 1e3)
    ce_ms, kd_ms = statistics.median(times[False]), statistics.median(times[True])
    _table("One optimiser step of the digits MLP (64-256-256-10, batch 64, AdamW), CPU",
           ["loss", "ms per step (median)", "relative"],
           [["cross-entropy", f"{ce_ms:.3f}", "1.00x"], ["vanilla KD (T=4, alpha=0.5)", f"{kd_ms:.3f}",
                                                         f"{ce_ms / kd_ms:.2f}x"]], args.out,
           f"{args.repeats} alternating blocks of 2,000 steps after 200 warm-up steps; model, loss and optimiser only.")


# ---------------------------------------------------------------------------------------------- classes per batch

def classes(args: argparse.Namespace) -> None:
    from kdcache.cache import schema
    from kdcache.train.batches import EpochOrder

    rows_out = []
    for name, n, num_classes, batch, budgets in (("ImageNet-1k", 1_280_000, 1000, 256, (64, 512, 1024)),
                                                 ("CIFAR-100", 50_000, 100, 128, (2, 8))):
        labels = np.repeat(np.arange(num_classes), n // num_classes)  # class-sorted, as an image folder is
        chunk_rows = schema.default_chunk_rows(num_classes, 2)
        chunk_bytes = chunk_rows * (num_classes * 2 + 8)
        chunks = -(-n // chunk_rows)
        modes = [("memory: full shuffle", EpochOrder(n, batch, seed=0))]
        for budget_mb in budgets:  # budgets whose window holds fewer than all the chunks
            window = max(1, (budget_mb * 2**20) // 2 // chunk_bytes)
            modes.append((f"chunks, budget {budget_mb} MiB (windows of {min(window, chunks)} of {chunks} chunks of "
                          f"{chunk_rows:,} rows)", EpochOrder(n, batch, seed=0, chunk_rows=chunk_rows,
                                                               window_chunks=window)))
        for label, order in modes:
            plan = order.plan(1)
            distinct = [len(np.unique(labels[b])) for b in plan.batches[:2000]]
            rows_out.append([name, label, f"{np.mean(distinct):.1f}", min(distinct)])
    _table("Distinct classes in a batch of a class-sorted split, per shuffle mode",
           ["split", "mode", "classes per batch (mean)", "min"], rows_out, args.out,
           "Batches of 256 (ImageNet) or 128 rows; the first 2000 batches of epoch 1. A uniform draw gives about "
           "225 of 1000 classes in 256 rows and 72 of 100 in 128.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("startup")
    p.add_argument("--rows", type=int, nargs="+", default=[5000, 50000])
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("imagenet")
    p.add_argument("--unique", type=int, default=4000)
    p.add_argument("--per-class", type=int, default=1280)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workdir", default="/tmp/kdcache-bench-imagenet")
    p.add_argument("--build-only", action="store_true", help="write the tree and the cache, run nothing")
    p = sub.add_parser("throughput")
    p.add_argument("--repeats", type=int, default=3)
    sub.add_parser("classes")
    p = sub.add_parser("kdloss")
    p.add_argument("--repeats", type=int, default=3)
    for p in sub.choices.values():
        p.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    {"startup": startup, "imagenet": imagenet, "throughput": throughput, "classes": classes,
     "kdloss": kdloss}[args.what](args)


if __name__ == "__main__":
    main()
