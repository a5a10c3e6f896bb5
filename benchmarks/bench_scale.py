"""Issue 13's ratios, measured side by side in one process: what a student costs with a cache.

    python benchmarks/bench_scale.py --device cuda            # benchmarks/gpu_check.sh runs this on one GPU
    python benchmarks/bench_scale.py --device cpu --quick     # the same ratios, sized for a 2-core CPU

1. distill (Continuation-KD, cached logits) vs CE-only `train` of the same student: training samples/s
   (evaluation excluded), ResNet-8 on CIFAR-10-shaped pickles (batch 128) and a 4-layer BERT on an SST-2-shaped
   TSV (batch 64, the paper's GLUE batch);
2. distill vs online KD (the teacher's forward in the loop): ResNet-110 -> ResNet-8 and a 24-layer -> 4-layer BERT;
3. `sweep` of 8 students (8 margins, one seed) vs 8 sequential `distill` runs of the same flags: wall seconds;
4. `cache-teacher` vs the bare teacher forward over the same inputs: rows/s;
5. the floor: the student alone, CE steps on one batch already on the device (no data path, no loop of ours).

The data is synthetic (random pixels, random words from a 150-word vocabulary) and the teachers untrained: only
speed is measured. Nothing is downloaded; `../shared` is not needed (the device machine does not have it).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_data_path import write_cifar  # noqa: E402

from kdcache.cache.info import describe_cache  # noqa: E402
from kdcache.data import DataOptions, load_split  # noqa: E402
from kdcache.methods.losses import vanilla_kd_loss  # noqa: E402
from kdcache.models import build_model, save_model_dir  # noqa: E402
from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher  # noqa: E402
from kdcache.recipes.distill import distill  # noqa: E402
from kdcache.recipes.sweep import SweepConfig, sweep  # noqa: E402
from kdcache.runtime import autocast, resolve_device  # noqa: E402
from kdcache.train.config import DistillConfig  # noqa: E402
from kdcache.train.inputs import StudentInputs  # noqa: E402
from kdcache.train.optim import build_optimizer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_text_task(folder: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    """An SST-2-shaped folder (train.tsv, dev.tsv) of random sentences, and a tiny WordPiece tokenizer."""
    from teachers_for_tests import WORDS, make_tiny_tokenizer  # (no pytest: runs on a bare device)

    rng = np.random.default_rng(seed)
    data = folder / "SST-2"
    data.mkdir(parents=True)
    for name, n in (("train.tsv", rows), ("dev.tsv", max(64, rows // 10))):
        lines = ["sentence\tlabel"] + [" ".join(rng.choice(WORDS, rng.integers(8, 40))) + f"\t{rng.integers(0, 2)}"
                                       for _ in range(n)]
        (data / name).write_text("\n".join(lines) + "\n")
    make_tiny_tokenizer(folder / "tokenizer")
    return data, folder / "tokenizer"


def bert(folder: Path, layers: int, hidden: int, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(2, hidden // 64), intermediate_size=4 * hidden, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def online_kd(teacher, student_spec: str, split, tokenizer, epochs: int, batch_size: int,
              device: torch.device, precision: str) -> float:
    """Vanilla KD with the teacher's forward on every batch (what a cache saves); training samples/s."""
    from kdcache.models import build_student

    inputs = StudentInputs(split, device, workers=4 if device.type == "cuda" else 0)
    probe = inputs.batch(np.arange(2))
    student = build_student(student_spec, 2 if split.modality == "text" else 10, tokenizer=tokenizer,
                            seed=0, sample=probe)
    student.model.to(device).train()
    teacher.model.to(device).eval()
    optimizer = build_optimizer("adamw", student.model, lr=1e-4, weight_decay=0.0)
    order = np.random.default_rng(0).permutation(len(inputs))
    batches = [order[a:a + batch_size] for a in range(0, len(order), batch_size)]
    rows, start = 0, None
    for epoch in range(epochs + 1):  # epoch 0 warms up
        if epoch == 1:
            _sync(device)
            start = time.perf_counter()
        for _, x, labels in inputs.epoch(batches, epoch=epoch, train=True):
            labels = labels.to(device)
            with torch.inference_mode(), autocast(device, precision):
                target = teacher(x).float()
            with autocast(device, precision):
                out = student(x)
            loss = vanilla_kd_loss(out.float(), target.clone(), labels, temperature=4.0, alpha=0.5)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rows += len(labels) if epoch else 0
    _sync(device)
    return rows / (time.perf_counter() - start)


def student_alone(student_spec: str, split, tokenizer, batch_size: int, device: torch.device, precision: str,
                  steps: int | None = None) -> float:
    """The floor: CE steps of the student on one batch already on the device (no data path, no loop of ours)."""
    from kdcache.models import build_student

    steps = steps or (100 if device.type == "cuda" else 10)
    inputs = StudentInputs(split, device, workers=0)
    _, x, labels = next(inputs.epoch([np.arange(batch_size)], train=True))
    labels = labels.to(device)
    student = build_student(student_spec, 2 if split.modality == "text" else 10, tokenizer=tokenizer, seed=0,
                            sample=inputs.batch(np.arange(2)))
    student.model.to(device).train()
    optimizer = build_optimizer("adamw", student.model, lr=1e-4, weight_decay=0.0)
    warm = 10 if device.type == "cuda" else 2
    for i in range(steps + warm):  # warm-up steps first
        if i == warm:
            _sync(device)
            start = time.perf_counter()
        with autocast(device, precision):
            out = student(x)
        loss = torch.nn.functional.cross_entropy(out.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def bare_forward(teacher, split, batch_size: int, device: torch.device, precision: str) -> float:
    """The teacher alone over the rows in order, through the same input pipeline: rows/s."""
    inputs = StudentInputs(split, device, workers=4 if device.type == "cuda" else 0, keep_bytes=0)
    teacher.model.to(device).eval()
    rows = np.arange(len(inputs))
    batches = [rows[a:a + batch_size] for a in range(0, len(rows), batch_size)]
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast(device, precision):
        for _, x, _ in inputs.epoch(batches):
            out = teacher(x)
            out.float().cpu()
    _sync(device)
    return len(rows) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="sizes for a 2-core CPU (a few minutes)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: does every part run (a minute on a CPU)")
    parser.add_argument("--out", type=Path, default=None, help="append the table (Markdown) to this file")
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    precision = "bf16" if gpu else "fp32"
    size = dict(cifar_rows=2000 if args.quick else 20000, text_rows=800 if args.quick else 8000,
                epochs=1 if args.quick else 2, teacher_cnn="resnet56" if args.quick else "resnet110",
                teacher_bert=(12, 256) if args.quick else (24, 1024), sweep_epochs=1 if args.quick else 2)
    if args.smoke:
        size = dict(cifar_rows=300, text_rows=200, epochs=1, teacher_cnn="resnet20", teacher_bert=(2, 64),
                    sweep_epochs=1)
    rows_out: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cifar = write_cifar(tmp / "cifar", size["cifar_rows"], test_rows=500)
        text, tok = write_text_task(tmp / "text", size["text_rows"])
        student_bert = tmp / "bert4.json"
        student_bert.write_text('{"model_type": "bert", "hidden_size": 256, "num_hidden_layers": 4, '
                                '"num_attention_heads": 4, "intermediate_size": 1024}')
        torch.manual_seed(0)
        cnn_teacher = save_model_dir(_settled(build_model(size["teacher_cnn"], 10)), tmp / "cnn-teacher",
                                     architecture=size["teacher_cnn"], num_classes=10, kwargs={})
        bert_teacher = bert(tmp / "bert-teacher", *size["teacher_bert"], tok)
        settings = (("ResNet-8, CIFAR-10", "resnet8", "cifar10", cifar, cnn_teacher, 128, {}),
                    ("BERT-4L, SST-2", str(student_bert), "sst2", text, bert_teacher, 64,
                     {"tokenizer": str(tok)}))
        for name, student, task, data, teacher_dir, batch, extra in settings:
            began = time.perf_counter()
            try:
                rows_out.append(_setting(tmp, name, student, task, data, teacher_dir, batch, extra, size, device,
                                         precision, tok))
            except Exception as exc:  # one failed setting must not cost the rest of a borrowed GPU's minutes
                traceback.print_exc()
                rows_out.append([name] + [f"failed: {type(exc).__name__}"] + ["-"] * 8)
            print(rows_out[-1], f"({time.perf_counter() - began:.0f} s)", flush=True)
            _save(args.out, ["partial: | " + " | ".join(rows_out[-1]) + " |"])
        # sweep of 8 students vs 8 lone runs (ResNet-8, CIFAR-10)
        swept = lone = float("nan")
        try:
            swept, lone = _sweep_vs_lone(tmp, size, device, precision)
        except Exception:
            traceback.print_exc()
        _save(args.out, [f"partial: sweep {swept:.1f} s, lone {lone:.1f} s", ""])
    header = ["setting", "train samples/s", "distill samples/s", "distill / train", "online KD samples/s",
              "distill / online", "cache-teacher rows/s", "bare teacher forward rows/s", "cache-teacher / bare",
              "student alone samples/s"]
    lines = [f"device {device} ({torch.cuda.get_device_name() if gpu else 'CPU'}), precision {precision}, "
             f"teachers {size['teacher_cnn']} and BERT-{size['teacher_bert'][0]}L, {size['epochs']} epoch(s)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows_out]
    lines += ["", f"sweep of 8 ResNet-8 students (8 margins, {size['sweep_epochs']} epoch(s)): {swept:.1f} s; "
              f"8 sequential distill runs: {lone:.1f} s; speed-up {lone / swept:.2f}x"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        with open(args.out, "a") as f:
            f.write(text + "\n")


def _setting(tmp: Path, name: str, student: str, task: str, data: Path, teacher_dir: Path, batch: int,
             extra: dict, size: dict, device: torch.device, precision: str, tok: Path) -> list[str]:
    """One row of the table: train, distill, online KD, cache-teacher and the bare teacher forward."""
    cache = cache_teacher(CacheTeacherConfig(teacher=str(teacher_dir), task=task, data=str(data),
                                             out=tmp / f"{task}.kdcache", splits=("train", "validation"
                                             if task == "sst2" else "test"), device=str(device),
                                             precision=precision, progress=False, batch_size=256))
    # the teacher pass as the cache records it (loading the teacher and opening the data excluded, as
    # they are for the bare forward below)
    capture = describe_cache(cache)["throughput"]["train"]["rows_per_second"]
    common = dict(student=student, epochs=size["epochs"], batch_size=batch, device=str(device),
                  precision=precision, progress=False, lr=1e-3 if task == "sst2" else 0.05)
    rates = {}
    for label, cfg in (("warm-up", dict(cache=cache, method="ce")),
                       ("train", dict(task=task, data=str(data), method="ce", **extra)),
                       ("distill", dict(cache=cache, method="continuation"))):
        summary = distill(DistillConfig(out=tmp / f"{task}-{label}", **common, **cfg))
        rates[label] = summary["samples_per_second"]
    tokenizer = None if task == "cifar10" else _tokenizer(tok)
    split = load_split(task, data, "train", options=DataOptions(), tokenizer=tokenizer)
    from kdcache.models import load_teacher

    teacher = load_teacher(str(teacher_dir))
    online = online_kd(teacher, student, split, tokenizer, size["epochs"], batch, device, precision)
    bare = bare_forward(teacher, split, 256, device, precision)
    alone = student_alone(student, split, tokenizer, batch, device, precision)
    return [name, f"{rates['train']:,.0f}", f"{rates['distill']:,.0f}",
                     f"{rates['distill'] / rates['train']:.2f}x", f"{online:,.0f}",
                     f"{rates['distill'] / online:.1f}x", f"{capture:,.0f}", f"{bare:,.0f}",
                     f"{capture / bare:.2f}x", f"{alone:,.0f}"]


def _sweep_vs_lone(tmp: Path, size: dict, device: torch.device, precision: str) -> tuple[float, float]:
    """Wall seconds of a sweep of 8 ResNet-8 students (8 margins) and of 8 sequential distill runs."""
    margins = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    base = DistillConfig(student="resnet8", cache=tmp / "cifar10.kdcache", epochs=size["sweep_epochs"],
                         batch_size=128, device=str(device), precision=precision, progress=False, lr=0.05,
                         out=tmp / "sweep")
    start = time.perf_counter()
    sweep(SweepConfig(base, {"margin": margins}, [0]))
    swept = time.perf_counter() - start
    start = time.perf_counter()
    for m in margins:
        distill(DistillConfig(**{**base.__dict__, "margin": m, "out": tmp / f"lone-{m}"}))
    lone = time.perf_counter() - start
    with open(tmp / "sweep" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 8
    return swept, lone


def _settled(model: torch.nn.Module) -> torch.nn.Module:
    """An untrained deep CNN with its batch-norm statistics measured on a few random batches: with the initial
    ones (mean 0, variance 1) ResNet-110's logits reach 1e8 in eval mode, which a float16 cache rightly refuses."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(256, 3, 32, 32))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def _save(out: Path | None, lines: list[str]) -> None:
    """Append as results come, so a run cut short by the device's time limit still leaves what it measured."""
    if out is not None:
        with open(out, "a") as f:
            f.write("\n".join(lines) + "\n")


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


if __name__ == "__main__":
    main()
