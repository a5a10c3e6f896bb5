"""Student training speed: `kdcache train` (CE only) vs `kdcache distill` (cached logits) vs online KD.

    python benchmarks/bench_distill.py [--rows 2048] [--epochs 2] [--teacher resnet56] [--device auto]

On the real CIFAR-10 JPEGs of ../shared/data (or $KDCACHE_DATA): a ResNet-8 student, a CIFAR ResNet teacher
(random weights: only speed is measured). The three runs share kdcache's loop components, batch size and
student; "online KD" runs the teacher's forward pass on every batch, as KD without a cache must. Reported:
training samples/s (evaluation excluded), the one-off cost of cache-teacher, and after how many student runs
the cache has paid for itself.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from kdcache.data import DataOptions, load_split
from kdcache.methods.losses import vanilla_kd_loss
from kdcache.models import build_model
from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
from kdcache.recipes.distill import DistillConfig, distill
from kdcache.runtime import resolve_device
from kdcache.train.batches import LabelBatches
from kdcache.train.inputs import StudentInputs
from kdcache.train.optim import build_optimizer

DATA = Path(os.environ.get("KDCACHE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def online_kd(teacher: torch.nn.Module, split, rows: int, epochs: int, batch_size: int, device: torch.device) -> float:
    """Vanilla KD with the teacher in the loop (what a cache saves); returns training samples/s."""
    torch.manual_seed(0)
    student = build_model("resnet8", 10).to(device).train()
    teacher = teacher.to(device).eval()
    inputs = StudentInputs(split, device)
    batches = LabelBatches(inputs.labels, batch_size, seed=0, device=device)
    optimizer = build_optimizer("sgd", student, lr=0.05, weight_decay=5e-4)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch_rows, _, labels in batches.epoch(epoch):
            x = inputs.batch(batch_rows)
            with torch.inference_mode():
                teacher_logits = teacher(x)
            loss = vanilla_kd_loss(student(x), teacher_logits.clone(), labels, temperature=4.0, alpha=0.5)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return rows * epochs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    zip_path = DATA / "cifar10-jpg" / "cifar10-jpg-d7d0561.zip"
    options = DataOptions(limit=args.rows, normalize="cifar10")
    common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=0.05, device=str(device), progress=False,
                  val_split="none")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        teacher = build_model(args.teacher, 10)
        torch.save(teacher.state_dict(), tmp / "teacher.pt")
        start = time.perf_counter()
        cache = cache_teacher(CacheTeacherConfig(teacher=args.teacher, weights=str(tmp / "teacher.pt"),
                                                 task="imagefolder", data=str(zip_path), out=tmp / "c.kdcache",
                                                 splits=("train",), device=str(device), progress=False,
                                                 batch_size=256, data_options=options))
        cache_seconds = time.perf_counter() - start
        # warm-up: the first training steps of a process pay one-off costs (thread pools, allocator, kernels)
        distill(DistillConfig(student="resnet8", cache=cache, method="ce", out=tmp / "warmup", **common))
        trained = distill(DistillConfig(student="resnet8", task="imagefolder", data=str(zip_path), method="ce",
                                        out=tmp / "train", data_options=options, **common))
        distilled = distill(DistillConfig(student="resnet8", cache=cache, method="vanilla", out=tmp / "distill",
                                          **common))
        online = online_kd(teacher, load_split("imagefolder", zip_path, "train", options=options), args.rows,
                           args.epochs, args.batch_size, device)
    per_run_saving = args.rows * args.epochs * (1 / online - 1 / distilled["samples_per_second"])
    print(f"device {device}, {args.rows} CIFAR-10 JPEG rows, {args.epochs} epochs, batch {args.batch_size}, "
          f"student resnet8, teacher {args.teacher}")
    print("| run | training samples/s | relative to train |")
    print("|---|---|---|")
    base = trained["samples_per_second"]
    for name, rate in (("train (CE, no teacher)", base), ("distill vanilla (cached logits)", distilled["samples_per_second"]),
                       (f"online vanilla KD ({args.teacher} in the loop)", online)):
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x |")
    print(f"cache-teacher, once: {cache_seconds:.1f} s ({args.rows / cache_seconds:,.0f} rows/s, includes decoding); "
          f"each distill run of {args.epochs} epochs saves {per_run_saving:.1f} s over online KD"
          + (f", so the cache pays for itself after {cache_seconds / per_run_saving:.2f} runs" if per_run_saving > 0
             else ""))


if __name__ == "__main__":
    main()
