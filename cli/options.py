"""Every flag of the `kdcache` commands, declared once: a command's signature names these types, and a flag that
several commands share (the device, the data columns, the storage options, the training hyper-parameters) has
one spelling, one help text and one default everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

_O = typer.Option

TASKS = ("sst2 cola mrpc rte stsb qnli qqp mnli | text | cifar10 cifar100 mnist fashion-mnist svhn imagenet "
         "imagefolder | digits tabular")

# --- where things are ---------------------------------------------------------------------------------------------
CacheArg = Annotated[str, typer.Argument(help="Cache: a folder, or an fsspec URL such as s3://bucket/name.kdcache.")]
CacheOpt = Annotated[str, _O("--cache", help="Teacher cache (a folder or an fsspec URL) with a train split.")]
CacheOut = Annotated[str, _O("--out", help="Cache to create: a folder, or an fsspec URL (s3://bucket/name.kdcache).")]
RunOut = Annotated[Path, _O("--out", help="Run folder: metrics.jsonl, summary.json, best/, last.pt.")]
StorageOption = Annotated[Optional[list[str]], _O(
    "--storage-option", help="fsspec storage option KEY=VALUE for a cache URL (endpoint_url=http://host:port, "
                             "key=..., anon=true); repeatable. Environment variables (FSSPEC_S3_ENDPOINT_URL, "
                             "AWS_ACCESS_KEY_ID, ...) work too.")]
Data = Annotated[Optional[str], _O(help="Dataset file or folder (GLUE task folder, CIFAR folder, the folder of "
                                        "the idx or .mat files, ImageNet root, image tree or zip).")]
DataMoved = Annotated[Optional[str], _O("--data", help="Dataset location, when it moved since caching.")]
Task = Annotated[str, _O(help=TASKS)]

# --- models ---------------------------------------------------------------------------------------------------------
Weights = Annotated[Optional[Path], _O(help="State-dict file for an architecture-name teacher.")]
Tokenizer = Annotated[Optional[str], _O(help="Tokenizer folder, when the model folder has none.")]
TrustModelCode = Annotated[bool, _O(help="Let Python code named by a model run: a module:factory architecture "
                                         "(a flag or a kdcache-model.json), a Hugging Face folder's or a cache's "
                                         "tokenizer's auto_map; only for code you trust.")]
ModelKwargs = Annotated[Optional[str], _O(help="JSON arguments for an architecture-name model.")]
LossChunk = Annotated[Optional[int], _O(help="A language-model cache: positions whose logits (and loss) are "
                                            "computed at once, under activation checkpointing, so the loss's memory "
                                            "is chunk x vocabulary, not batch x seq-len x vocabulary (default: "
                                            "2**24 / vocabulary positions, so it does not grow with V either).")]
StudentLayers = Annotated[Optional[int], _O(help="Keep only the first N transformer layers of a pre-trained Hugging "
                                                 "Face model folder (distill --student, train --model): a shallower "
                                                 "student initialised from its lower layers, with a fresh head.")]

TeacherBatchSize = Annotated[int, _O("--batch-size", help="Rows per teacher forward pass.")]

# --- the stored target (cache-teacher) ------------------------------------------------------------------------------
TopK = Annotated[Optional[int], _O("--topk", help="Store the K largest logits per row, their ids and the log-sum-exp "
                                                 "over all outputs (format version 2); K >= the teacher's outputs "
                                                 "stores dense logits.")]
LseTemperatures = Annotated[Optional[str], _O(help="With --topk: temperatures to record the log-sum-exp at, e.g. "
                                                   "1,2,4 (T = 1 always; default: 1 and every preset's "
                                                   "temperatures, 1..20).")]
DenseFallback = Annotated[bool, _O(help="With --topk: store dense logits when K is not below the teacher's outputs "
                                        "(--no-dense-fallback refuses instead).")]
SampleTokens = Annotated[Optional[int], _O(help="Store RS-KD targets: N draws per row from softmax(z/T), kept as "
                                                "unique ids, counts and log-probs (format version 2).")]
SampleTemperature = Annotated[float, _O(help="With --sample-tokens: the temperature T drawn at.")]
SampleSeed = Annotated[int, _O(help="With --sample-tokens: the seed; each row draws from (seed, its row), so a "
                                    "resume or torchrun capture draws the same.")]

# --- how to run -----------------------------------------------------------------------------------------------------
Device = Annotated[str, _O(help="auto (CUDA when present), cpu, cuda, cuda:N.")]
Precision = Annotated[str, _O(help="fp32, or bf16/fp16 autocast.")]
Seed = Annotated[int, _O(help="Seed (of the student's initialisation and the batch order; of the row sample).")]
Progress = Annotated[bool, _O(help="Show a progress bar (on stderr).")]
ProgressEvery = Annotated[Optional[str], _O(help="Where stderr is not a terminal (a log file): a progress line every "
                                                 "N steps (100) or every 30s, 5m (default 30s, or "
                                                 "$KDCACHE_PROGRESS_EVERY).")]
Json = Annotated[bool, _O("--json", help="Print machine-readable JSON.")]
Overwrite = Annotated[bool, _O(help="Replace what is at --out (only a kdcache cache or run folder).")]

# --- reading data ---------------------------------------------------------------------------------------------------
MaxLength = Annotated[int, _O(help="Text: truncate token sequences to this length.")]
TextColumn = Annotated[Optional[str], _O(help="Text task: column with the text (--task lm JSONL/Parquet: default "
                                                "'text').")]
VocabSize = Annotated[Optional[int], _O(help="train --task lm without --tokenizer: train a byte-level BPE of this "
                                            "many tokens on the train split.")]
SeqLen = Annotated[Optional[int], _O(help="--task lm: tokens per row (window of the token stream).")]
TextPairColumn = Annotated[Optional[str], _O(help="Text task: column with the second text of a pair.")]
LabelColumn = Annotated[Optional[str], _O(help="Text task: column with the label.")]
LabelNames = Annotated[Optional[str], _O(help="Text task: comma-separated label names, in id order.")]
Regression = Annotated[bool, _O(help="Text task: float labels (one output).")]
Normalize = Annotated[Optional[str], _O(help="Images: cifar10, cifar100, imagenet, mnist, fashion-mnist, svhn or "
                                                    "none (default: the task's own).")]
ImageSize = Annotated[Optional[int], _O(help="Images: shorter side to this size, then a centred square crop "
                                                   "(imagenet: 224).")]
Limit = Annotated[Optional[int], _O(help="Use only the first N rows of each split.")]
Subset = Annotated[Optional[int], _O(help="Use N rows spread evenly over each split (after --limit).")]
ReportSplit = Annotated[Optional[str], _O(help="Also score this split every epoch, never selecting on it (the test "
                                                 "split): summary.json gives its score at the best epoch.")]
Holdout = Annotated[Optional[int], _O(help="Hold out N training rows (evenly spaced, after --subset) as the "
                                           "'validation' split; the rest stay 'train' (for datasets without one).")]
HoldoutTest = Annotated[Optional[int], _O(help="Hold out N more training rows (evenly spaced, after --holdout) as the "
                                               "'test' split (for a dataset that is one file).")]

# --- training: None means the preset's (or the method's) value -------------------------------------------------------
Epochs = Annotated[Optional[int], _O(help="Epochs n (preset: cifar 200, glue 30, small 30).")]
Preset = Annotated[str, _O(help="auto | cifar | glue | small | text-scratch | lm: the defaults of the training flags "
                                       "(auto: by the task and the model).")]
Lr = Annotated[Optional[float], _O(help="Peak learning rate.")]
BatchSize = Annotated[Optional[int], _O(help="Minibatch size.")]
Optimizer = Annotated[Optional[str], _O(help="sgd | adamw | adam.")]
WeightDecay = Annotated[Optional[float], _O(help="Weight decay (not on biases and norms).")]
Momentum = Annotated[Optional[float], _O(help="SGD momentum.")]
LrSchedule = Annotated[Optional[str], _O(help="constant | linear | cosine.")]
WarmupRatio = Annotated[Optional[float], _O(help="Fraction of steps of linear warm-up.")]
MaxGradNorm = Annotated[Optional[float], _O(help="Clip gradients to this norm (0: off).")]
ValSplit = Annotated[Optional[str], _O(help="Split that selects the best checkpoint (default: validation, else "
                                            "test; none: the train split).")]
SaveEvery = Annotated[Optional[int], _O(help="Also save the model every N epochs under checkpoints/.")]
Resume = Annotated[bool, _O(help="Continue the run in --out from its last.pt.")]
StopAfterEpoch = Annotated[Optional[int], _O(help="Stop after this epoch (a preemptible job's slice; --resume "
                                                  "later).")]

Augment = Annotated[Optional[str], _O(help="Random views of training images: cifar (pad 4, crop, flip) | imagenet "
                                          "(random resized crop, flip) | none.")]
Views = Annotated[Optional[int], _O(help="Images: also store the teacher's target on V augmented views of every row "
                                          "(with --augment), and each view's parameters, for exact replay.")]
ViewAugment = Annotated[Optional[str], _O("--augment", help="With --views: the views' augmentation, cifar (pad 4, "
                                                            "crop, flip) | imagenet (random resized crop, flip).")]
ViewSeed = Annotated[int, _O(help="With --views: the seed; each row's views are drawn from (seed, its row).")]
ViewOrder = Annotated[Optional[str], _O(help="A views cache: which view each row trains on: cycle (view e mod V in "
                                             "epoch e; the default), random (from seed and epoch), plain (the plain "
                                             "image and its target, as without views).")]
NumWorkers = Annotated[Optional[int], _O(help="Processes decoding inputs (default: up to 4 for images and text, 0 for "
                                              "feature tables).")]
KeepInputs = Annotated[Optional[str], _O(help="Keep decoded inputs after the first epoch while they fit this size "
                                              "(default 2GiB; 0: decode every epoch).")]
LogEvery = Annotated[int, _O(help="Read the loss back from the device (and check it) every N steps; 0: once per "
                                  "epoch.")]
MaxSteps = Annotated[Optional[int], _O(help="Stop after N optimiser steps, evaluating once (smoke runs, benchmarks).")]
Compile = Annotated[bool, _O(help="torch.compile the student.")]

# --- distillation ---------------------------------------------------------------------------------------------------
Method = Annotated[str, _O(help="continuation | vanilla | annealing | ce | prokd | curriculum")]
TMax = Annotated[Optional[int], _O(help="Continuation/Annealing: maximum temperature T_max.")]
Margin = Annotated[Optional[float], _O(help="Continuation: hinge margin m.")]
Psi = Annotated[Optional[str], _O(help="Continuation: psi schedule cifar | glue | linear:E | step:K | constant:V.")]
Reduction = Annotated[str, _O(help="Continuation hinge: sample | batch | element | mse (the authors' code); "
                                    "annealing: element or mse average stage 1 over the outputs.")]
PhiOn = Annotated[Optional[str], _O(help="Continuation: what phi anneals, both (Eq. 4, the default) | teacher | "
                                         "margin | none (the paper's Table 7 ablation).")]
TopkTail = Annotated[Optional[str], _O(help="Vanilla KD on a top-k cache: the outputs not kept as one exact bucket "
                                             "(bucket, the default) or renormalised away (renormalised, DistillKit's "
                                             "approximation, for comparison).")]
Alpha = Annotated[Optional[float], _O(help="Vanilla KD: weight of the hard-label term.")]
Temperature = Annotated[Optional[float], _O(help="Vanilla KD: softening temperature.")]
AnnealEpochs = Annotated[Optional[int], _O(help="Annealing-KD: stage-1 epochs K (default: the preset's share).")]
AnnealContinuous = Annotated[bool, _O(help="Annealing-KD: stage 2 keeps stage 1's optimiser and learning-rate "
                                           "schedule (default: both start afresh, as the authors' code trains it).")]
ScheduleUnit = Annotated[str, _O(help="epoch | step: when T and psi move.")]
AbsoluteSchedules = Annotated[bool, _O(help="Keep the preset's T_max and psi in the paper's absolute epochs when "
                                            "--epochs differs from the preset's (default: fitted to the run, the "
                                            "paper's shape, T reaching 1).")]
Stream = Annotated[str, _O(help="Logit reading: auto | memory | chunks.")]
Checkpoint = Annotated[Optional[str], _O(help="Distil from this cached teacher checkpoint (see kdcache info).")]
KdLoss = Annotated[Optional[str], _O(help="prokd, curriculum: logit loss vanilla (default) | continuation.")]
PhaseEpochs = Annotated[Optional[str], _O(help="curriculum: epochs of each projection phase, e.g. 5,5; prokd: epochs "
                                               "per checkpoint.")]
MemoryBudget = Annotated[Optional[str], _O(help="Host memory for the teacher's targets: a share of RAM (0.25, the "
                                                "default) or a size (4GiB); beyond it they stream by chunk windows.")]
CheckFirst = Annotated[bool, _O(help="Compare every row with the cache before training (by default each row is "
                                     "checked as it is first decoded).")]
LayerMap = Annotated[Optional[str], _O(help="curriculum: teacher layer -> student layer or module, e.g. 2:1,4:2.")]
