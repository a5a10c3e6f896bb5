"""A student's run and its lifecycle, which `distill` (one run) and `sweep` (many on the same batches) share:
the data loaded and checked (`load_data`), the run built (`build_run`: hyper-parameters, student, method,
optimiser) and its folder opened fresh or resumed (`open_folder`), the teacher's targets attached (`attach_targets`),
then, after its epochs (kdcache/train/fit.py), its summary (`close_run`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.errors import KDCacheError
from kdcache.methods import MethodOptions, Run, make_method
from kdcache.methods.targets import target_kind
from kdcache.models import build_student, student_family
from kdcache.names import better, parse_budget
from kdcache.runtime import command_line, out_of_memory_said, utc_now
from kdcache.train.batches import EpochOrder, TeacherTargets, stored_name
from kdcache.train.config import DistillConfig, Settings, settings
from kdcache.train.dist import World
from kdcache.methods.tokens import check_head
from kdcache.train.inputs import (RowCheck, RowRecord, RunData, check_lm_student, check_student, has_labels,
                                  input_options,
                                  load_dataset_only, load_run_data, probe_batch, selection_note)
from kdcache.train.loop import Stepper
from kdcache.train.metrics import (clearly_better, compute_metrics, constant_baseline, primary_metric,
                                   unigram_perplexity)
from kdcache.train.optim import build_lr_schedule, build_optimizer
from kdcache.train.run_dir import IDENTITY_VERSION, RunDir, rng_state, set_rng_state

log = logging.getLogger("kdcache")


@dataclass
class StudentRun:
    """One student's run, set up and ready for its epochs: what `distill` trains alone and `sweep` trains beside
    others on the same batches."""

    cfg: DistillConfig
    hp: dict[str, Any]
    preset: str
    epochs: int
    stepper: Stepper
    run_dir: RunDir
    progress: dict[str, Any]
    state: dict[str, Any] | None  # last.pt of the interrupted run being resumed
    teacher_val: dict[str, float] | None = None  # the teacher's own scores on the selection split
    new_optimiser: Any = None  # epoch -> (optimiser, schedule) for the phase that begins there
    settings: Settings | None = None  # how hp was chosen (preset and why, schedules fitted to the run's length)
    order: Any = None
    targets: Any = None

    @property
    def batch_size(self) -> int:
        return int(self.hp["batch_size"])


def method_for(cfg: DistillConfig) -> Any:
    """The run's method, made from its flags; a method that reads a teacher cache refused without one."""
    method = make_method(cfg.method, MethodOptions(
        checkpoint=cfg.checkpoint, kd_loss=cfg.kd_loss, phase_epochs=cfg.phase_epochs, layer_map=cfg.layer_map,
        reduction=cfg.reduction, anneal_continuous=cfg.anneal_continuous, phi_on=cfg.phi_on,
        topk_tail=cfg.topk_tail))
    if cfg.cache is None and method.needs_cache:
        raise KDCacheError(f"method {cfg.method!r} needs a teacher cache (--cache)")
    if cfg.cache is not None and method.needs_cache and cfg.checkpoint is None:  # before any data is read
        from kdcache.cache.reader import as_store, read_header
        from kdcache.methods.targets import check_kind

        store = as_store(cfg.cache, cfg.storage_options)
        check_kind(read_header(store)[0].target_spec().kind, type(method).target_kinds, cfg.method, str(store))
    return method


def load_data(cfg: DistillConfig, world: World, device: torch.device) -> RunData:
    """The cache's own dataset, each row checked against the cache as it is first decoded (or, for `train`, the
    dataset alone); inputs are decoded by worker processes, batch by batch. Under torchrun, a rank that cannot
    read the cache or the data stops them all."""
    reading = input_options(cfg, device)
    if cfg.cache is not None:
        data = world.all_ok(lambda: load_run_data(cfg.cache, storage_options=cfg.storage_options, data=cfg.data,
                                                  val_split=cfg.val_split, device=device, options=reading,
                                                  report_split=cfg.report_split,
                                                  trust_model_code=cfg.trust_model_code))
    else:
        tokenizer_source = cfg.tokenizer or (cfg.student if Path(cfg.student).is_dir() else None)
        data = world.all_ok(lambda: load_dataset_only(cfg.task, cfg.data, cfg.data_options,
                                                      tokenizer_source=tokenizer_source, val_split=cfg.val_split,
                                                      device=device, reading=reading,
                                                      trust_model_code=cfg.trust_model_code))
        for split in filter(None, (data.train, data.val)):  # no cache to check against: record what is read
            split.inputs.check = RowRecord(len(split.inputs))
    if not has_labels(data.selection.labels, data.kind):
        raise KDCacheError(f"split {data.selection.name!r} has no labels to select the best checkpoint on; "
                           "pass --val-split with a labelled split")
    note = selection_note(data.selection.name)
    if note and world.main:  # said before the first epoch, not only beside the result
        log.info(f"note: {note}")
    return data


def baseline(data: RunData) -> dict[str, Any]:
    """A constant predictor's score on the selection split (the training labels' majority class, or their mean; a
    language model's training-token frequencies): the floor a run must clear, against which a collapse is measured
    (kdcache/train/metrics.py)."""
    if data.kind == "lm":
        return _unigram_baseline(data)
    return constant_baseline(data.train.labels, data.selection.labels, task=data.task, kind=data.kind,
                             label_names=data.label_names)


def _unigram_baseline(data: RunData) -> dict[str, Any]:
    """A language model's constant predictor: the training tokens' frequencies, scored on the selection split's
    next tokens (the real positions the loss and the perplexity average over)."""
    from kdcache.data.lm import next_token_targets

    train, selection = data.train.inputs.split.dataset, data.selection.inputs.split.dataset
    real = np.arange(train.ids.shape[1])[None, :] < train.lengths[:, None]
    following = next_token_targets(torch.from_numpy(np.asarray(selection.ids, dtype=np.int64)),
                                   torch.from_numpy(selection.lengths),
                                   torch.from_numpy(selection.labels.astype(np.int64)), ignore=-1).numpy()
    value = unigram_perplexity(np.asarray(train.ids)[real], following[following >= 0], data.num_outputs)
    return {"metric": value, "predictor": "the training tokens' frequencies (a unigram model)"}


def open_run(cfg: DistillConfig, data: RunData, world: World, device: torch.device, method: Any = None) -> StudentRun:
    """Hyper-parameters, student, method and optimiser of one run, and its folder: fresh, or resumed from last.pt
    of the very same run."""
    run = build_run(cfg, data, world, device, method)
    open_folder(run, data)
    return run


def build_run(cfg: DistillConfig, data: RunData, world: World, device: torch.device, method: Any = None) -> StudentRun:
    """Hyper-parameters, student, method (set up against the cache: a one-line error for arrays it lacks) and
    optimiser of one run; nothing written yet."""
    method = method or method_for(cfg)
    lm = data.kind == "lm"
    if lm:
        check_lm_method(method, cfg, data)
        world.agree(lambda: check_lm_student(cfg.student, data.tokens, cfg.trust_model_code))
    chosen = settings(cfg.preset, "lm" if lm else data.modality, method, cfg,  # preset, method, flags
                      None if lm else student_family(cfg.student))
    preset, hp = chosen.preset, chosen.values
    if world.main:
        log.info(chosen.line(cfg.method))
    n, batch_size = int(hp["epochs"]), int(hp["batch_size"])
    replay = getattr(data.train.inputs, "replay", None)
    if world.main and replay is not None:  # repeats under a long schedule are visible before the first step
        views = replay.describe(n)
        log.info(f"views: the student replays the teacher's {views['views']} {views['augment']} views of each row "
                 f"({views['order']} order); epochs / V = {n} / {views['views']} = {views['epochs_per_view']:g} "
                 "passes over each view" + (" (views repeat)" if n > views["views"] else ""))
    probe = probe_batch(data.train.inputs)
    student = build_student(cfg.student, data.num_outputs, kwargs=cfg.student_kwargs, tokenizer=data.tokenizer,
                            seed=cfg.seed, trust_model_code=cfg.trust_model_code, sample=probe,
                            layers=cfg.student_layers, causal=lm)
    with out_of_memory_said(f"student {student.spec} ({student.parameters_count():,} parameters) does not fit on "
                            f"{device}", "choose a smaller student" + (" (or --device cpu)" if device.type != "cpu"
                                                                       else "")):
        student.model.to(device)
        if device.type == "cuda" and data.modality == "image":  # convolutions run fastest on NHWC on the GPU
            student.model.to(memory_format=torch.channels_last)
        check_student(student, probe, data.num_outputs)
        if lm:
            check_head(student.model, {k: v.to(device) for k, v in probe.items()}, student.spec)
    if cfg.compile:
        student.model = torch.compile(student.model)
    steps_per_epoch = -(-len(data.train.inputs) // batch_size)
    method.setup(Run(hp, n, steps_per_epoch, cfg.schedule_unit, data.kind, data.train.cache, student, probe,
                     str(cfg.cache), cfg.loss_chunk))
    if world.main and (advice := method.advice()):
        log.info(advice)
    trainable = torch.nn.ModuleList([student.model, *filter(None, [method.modules()])])
    if world.distributed:  # rank 0's weights everywhere; then each rank its own random stream (dropout)
        world.broadcast_parameters(trainable)
        torch.manual_seed(cfg.seed * 1_000_003 + world.rank)

    def new_optimiser(first: int) -> tuple[Any, Any]:
        """The optimiser and its learning-rate schedule for the phase that begins at epoch `first`: the whole run,
        unless the method restarts them (Annealing-KD's stage 2)."""
        last = min([r - 1 for r in method.restart_epochs() if r > first] + [n])
        steps = (last - first + 1) * steps_per_epoch
        optimizer = build_optimizer(hp["optimizer"], trainable, lr=float(hp["lr"]),
                                    weight_decay=float(hp["weight_decay"]), momentum=float(hp["momentum"]),
                                    compiling=cfg.compile)
        return optimizer, build_lr_schedule(hp["lr_schedule"], optimizer, total_steps=steps,
                                            warmup_steps=int(round(float(hp["warmup_ratio"]) * steps)))

    optimizer, scheduler = new_optimiser(1)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16" and device.type == "cuda")
    stepper = Stepper(student, method, optimizer, scheduler, scaler, device, cfg.precision, hp["max_grad_norm"],
                      list(trainable.parameters()), world)

    progress = {"epoch": 0, "step": 0, "best": None,
                "totals": {"train_seconds": 0.0, "train_samples": 0, "wall_seconds": 0.0}}
    return StudentRun(cfg, hp, preset, n, stepper, RunDir(Path(cfg.out), _identity(cfg, hp, preset, data, method)),
                      progress, None, _teacher_metrics(data, method.teacher_array), new_optimiser, chosen)


def check_lm_method(method: Any, cfg: DistillConfig, data: RunData) -> None:
    """A token-level cache trains causal-LM students with the methods whose loss is defined per token (every built-in
    one; a method that does not declare `per_token` is one line), and a flag with no meaning for a causal LM is one
    line."""
    if not type(method).per_token:
        from kdcache.methods import METHODS

        can = ", ".join(name for name, m in METHODS.items() if m.per_token)
        raise KDCacheError(f"{cfg.cache}: a language-model cache (targets per token); --method {cfg.method} does not "
                           f"train causal-LM students yet (methods that do: {can})")
    if cfg.student_kwargs:
        raise KDCacheError("--student-kwargs applies to architecture-name students; a causal-LM student is a Hugging "
                           "Face config JSON or model folder")


def open_folder(run: StudentRun, data: RunData) -> None:
    """The run's folder: made fresh, or last.pt of the very same run loaded and restored."""
    legacy = (lambda: _legacy_digest(data, run.batch_size)) if data.train.cache is None else None
    run.state = _prepare(run.run_dir, run.cfg, run.stepper.world, legacy)
    if run.state is not None:
        _restore(run.state, run.stepper, run.run_dir, data, run.progress, run.new_optimiser)


def targets_plan(run: StudentRun, data: RunData) -> tuple[str, int | None] | None:
    """How this run's teacher targets are held, which decides its batch order: as its interrupted run held them
    (whatever this machine's memory or --memory-budget would choose now), else as its own arrays fit the budget;
    under torchrun decided once, on rank 0, so every rank cuts the same global batches."""
    if data.train.cache is None:
        return None
    if run.state and run.state.get("targets"):
        held = run.state["targets"]
        return held["mode"], held["window_chunks"]
    cfg, world = run.cfg, run.stepper.world
    views = _views(data)
    arrays = tuple(stored_name(data.train.cache, a, views) for a in run.stepper.method.arrays())
    return tuple(world.agree(lambda: TeacherTargets.choose(data.train.cache, arrays, cfg.stream_mode,
                                                           _budget(cfg))))


def _views(data: RunData) -> Any:
    """Which view each training row sees per epoch (kdcache.train.views.ViewChoice), when a views cache replays."""
    replay = getattr(data.train.inputs, "replay", None)
    return replay.choice if replay is not None else None


def _budget(cfg: DistillConfig) -> int:
    """--memory-budget, or the default share of RAM split between the processes torchrun started on this host."""
    budget = parse_budget(cfg.memory_budget)
    return budget if cfg.memory_budget is not None else budget // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def attach_targets(runs: list[StudentRun], data: RunData) -> None:
    """The batches of runs trained together (same seed, batch size and targets plan) and the teacher's targets
    for them, held once (for the union of the arrays their methods read)."""
    first = runs[0]
    cfg, device = first.cfg, first.stepper.device
    if data.train.cache is None:
        order, targets = EpochOrder(len(data.train.inputs), first.batch_size, seed=cfg.seed), None
    else:
        arrays = tuple(dict.fromkeys(a for run in runs for a in run.stepper.method.arrays()))
        mode, window = targets_plan(first, data)
        targets = TeacherTargets(data.train.cache, arrays, device=device, mode=mode, window_chunks=window,
                                 budget_bytes=_budget(cfg), views=_views(data))
        order = targets.order(first.batch_size, seed=cfg.seed)
    for run in runs:
        run.order, run.targets = order, targets
        run.progress["teacher_targets"] = targets.describe() if targets is not None else None


def close_run(run: StudentRun, data: RunData) -> dict[str, Any]:
    """The summary, written by rank 0 once every rank is done (its metrics.jsonl complete for all to read)."""
    world = run.stepper.world
    world.barrier()
    summary = _summary(run.cfg, run.stepper, data, run.run_dir, run.progress, run.hp, run.preset, run.epochs,
                       run.teacher_val, run.stepper.device)
    if run.settings is not None:
        summary.update(run.settings.record())
    replay = getattr(data.train.inputs, "replay", None)
    if replay is not None:
        summary["views"] = replay.describe(run.epochs)
    if world.main:
        run.run_dir.write_summary(summary)
    return summary


def _prepare(run_dir: RunDir, cfg: DistillConfig, world: World, legacy: Any) -> dict[str, Any] | None:
    """The run folder made (or last.pt proved to be this run's) by rank 0; the other ranks then read last.pt."""
    kept: dict[str, Any] = {}

    def prepare() -> bool:
        kept["state"] = run_dir.prepare(resume=cfg.resume, overwrite=cfg.overwrite,
                                        command=cfg.command or command_line(), legacy_digest=legacy)
        return kept["state"] is not None

    resumed = world.agree(prepare)
    if world.main or not resumed:
        return kept.get("state")
    return run_dir.prepare(resume=True, overwrite=False, command="", legacy_digest=legacy)


def snapshot(s: Stepper, progress: dict[str, Any], targets: Any, data: RunData) -> dict[str, Any]:
    """Everything a resume needs, as tensors and plain values (last.pt loads with torch's weights-only unpickler)."""
    return {**progress, "model": s.student.model.state_dict(), "method": s.method.state_dict(),
            "targets": targets.describe() if targets is not None else None, "rows": _row_state(data),
            "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
            "scaler": s.scaler.state_dict(), "world_size": s.world.size,
            "rng": progress["rng"] if "rng" in progress else rng_state(),  # (a sweep's student: its own stream)
            **({"rng_ranks": s.world.gather(rng_state())} if s.world.distributed else {})}


def _restore(state: dict[str, Any], s: Stepper, run_dir: RunDir, data: RunData, progress: dict[str, Any],
             new_optimiser: Any = None) -> None:
    """The run where last.pt left it (weights, method, optimiser, random streams, progress), refused in one line
    under another process count; best/ and metrics.jsonl brought back in step with it."""
    trained_by = int(state.get("world_size", 1))
    if trained_by != s.world.size:  # each rank's share of a batch, and its random stream, depend on the count
        launch = f"torchrun --nproc-per-node {trained_by}" if trained_by > 1 else "one process (no torchrun)"
        raise s.world.fail(f"{run_dir.last}: this run was trained by {trained_by} process(es), not "
                           f"{s.world.size}; resume it with {launch}, or start a new --out")
    s.student.model.load_state_dict(state["model"])
    s.method.load_state_dict(state["method"])
    begun = [r for r in s.method.restart_epochs() if r <= state["epoch"]]
    if begun and new_optimiser is not None:  # saved inside a later phase: its optimiser and schedule, then their state
        s.optimizer, s.scheduler = new_optimiser(max(begun))
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when the run began where fp16 scaling was off (e.g. on the CPU)
        s.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng_ranks"][s.world.rank] if s.world.distributed else state["rng"])
    progress.update({k: state[k] for k in ("epoch", "step", "best", "totals")})
    progress.update({k: state[k] for k in ("falling", "warnings") if k in state})  # (runs of earlier releases: none)
    for split in filter(None, (data.train, data.val)):  # `train`: the rows must be those the run trained on
        recorded = (state.get("rows") or {}).get(split.name)
        if data.train.cache is None and recorded is not None:
            split.inputs.check = RowCheck(recorded.numpy().view(np.uint64), split.inputs.labels, split.inputs.split.source,
                                          f"what this run read before ({run_dir.last})", "since the run began")
    if s.world.main:
        run_dir.repair_best(state, lambda epoch: save_model(run_dir, data, s, run_dir.out / "best",
                                                             {"epoch": epoch}))
        run_dir.truncate_metrics(state["epoch"])


def save_model(run_dir: RunDir, data: RunData, s: Stepper, directory: Path, extra: dict[str, Any]) -> None:
    """The student as a model folder that loads alone (best/, checkpoints/epoch-NNNN/): its width, label names and
    tokenizer with it."""
    run_dir.save_model(s.student, directory, num_outputs=data.num_outputs, label_names=data.label_names,
                       tokenizer=data.tokenizer, extra=extra)


def _identity(cfg: DistillConfig, hp: dict, preset: str, data: RunData, method: Any) -> dict[str, Any]:
    """What makes two runs the same run: config, resolved hyper-parameters, teacher and data digests."""

    cache = data.train.cache
    if cache is not None:
        digest = (cache.split_attrs.get("dataset") or {}).get("digest")
    else:  # `train` decodes nothing before it starts: the data is named by what it is read with and its labels
        split = data.train.inputs.split  # (not where it lies: a moved dataset still resumes; rows are checked then)
        preprocess = {k: v for k, v in split.preprocess.items() if k not in _PATH_KEYS}
        described = json.dumps({"task": split.task, "rows": len(split), "preprocess": preprocess},
                               sort_keys=True, default=str)
        digest = hashlib.sha256(described.encode() + np.ascontiguousarray(data.train.labels).tobytes()).hexdigest()
    sources = method.identity() if cache is not None else {}
    identity = {"identity_version": IDENTITY_VERSION, "config": cfg.identity(), "hyperparameters": hp, "preset": preset,
                "teacher_sha256": data.teacher.get("sha256"), "data_digest": digest,
                **({"cached_sources": sources} if sources else {})}
    return json.loads(json.dumps(identity, default=str))


#: Preprocessing records that name where files lie, left out of a `train` run's data digest.
_PATH_KEYS = ("files", "tokenizer")


def _legacy_digest(data: RunData, batch_size: int) -> str:
    """A `train` run's data digest as identity version 2 made it: SHA-256 of every train row's fingerprint."""
    fingerprints = np.zeros(len(data.train.inputs), dtype=np.uint64)
    rows = np.arange(len(fingerprints))
    for done, batch in data.train.inputs._decoded([rows[a:a + batch_size] for a in range(0, len(rows), batch_size)],
                                                  fresh=True):
        fingerprints[done] = np.asarray(batch.fingerprint, dtype=np.uint64)
    return hashlib.sha256(fingerprints.tobytes()).hexdigest()


def _row_state(data: RunData) -> dict[str, torch.Tensor] | None:
    """`train`: the fingerprints of every row read, once every row has been (for a resume to check against)."""
    if data.train.cache is not None:
        return None
    rows = {}
    for split in filter(None, (data.train, data.val)):
        check = split.inputs.check
        if check is not None and check.done:
            rows[split.name] = torch.from_numpy(check.fingerprints.view(np.int64).copy())
    return rows or None


def _teacher_metrics(data: RunData, array: str | None) -> dict[str, float] | None:
    """The teacher's own score on the selection split, from its cached outputs: a reference beside the student's."""
    split = data.val
    if split is None or split.cache is None or array is None:
        return None
    if data.kind == "lm":
        # dense logits of the array the run reads (a --checkpoint's, always dense): its perplexity; top-k: none
        dense = target_kind(split.cache) == "dense" if array == "logits" else array in split.cache.extra_widths
        return _teacher_perplexity(split, array) if dense else None
    from kdcache.methods.targets import teacher_scores

    return compute_metrics(teacher_scores(split.cache, array), split.labels, task=data.task, kind=data.kind)


def _teacher_perplexity(split: Any, array: str = "logits", block: int = 64) -> dict[str, float]:
    """A dense language-model cache's teacher perplexity on its split (of `array`: the trained teacher's logits or a
    checkpoint's), over the real tokens the students are scored on (a top-k or sampled cache does not hold the
    probability of every next token, so it has none)."""
    from kdcache.data.lm import next_token_targets

    cache, total, count = split.cache, 0.0, 0
    for start in range(0, len(cache), block):
        stop = min(start + block, len(cache))
        ids, lengths, labels = (torch.from_numpy(cache.read(n, start, stop).astype(np.int64))
                                for n in ("input_ids", "lengths", "labels"))
        following = next_token_targets(ids, lengths, labels, ignore=-1)
        logits = torch.from_numpy(cache.read(array, start, stop).astype(np.float32))
        log_p = torch.log_softmax(logits, dim=-1).gather(-1, following.clamp(min=0)[..., None])[..., 0]
        total -= float(log_p[following >= 0].double().sum())
        count += int((following >= 0).sum())
    value = math.exp(min(total / max(count, 1), 700.0))
    return {"metric": value, "perplexity": value}


def _summary(cfg: DistillConfig, s: Stepper, data: RunData, run_dir: RunDir, progress: dict[str, Any], hp: dict,
             preset: str, n: int, teacher_val: dict | None, device: torch.device) -> dict[str, Any]:
    finished, best, totals = run_dir.read_metrics(), progress["best"], progress["totals"]
    return {
        "method": cfg.method, "objective": s.method.display_name(data.kind), "student": s.student.spec,
        "student_layers": cfg.student_layers, "student_parameters": s.student.parameters_count(),
        "cache": str(cfg.cache) if cfg.cache else None,
        "task": data.task, "preset": preset, "epochs": n, "epochs_done": len(finished),
        "complete": len(finished) == n and "stopped_at_step" not in progress, "metric_name": finished[-1]["metric_name"] if finished else None,
        "best_metric": best["metric"] if best else None, "best_epoch": best["epoch"] if best else None,
        "best_scores": best["scores"] if best else None,
        "last_metric": finished[-1]["metric"] if finished else None,
        "teacher_metric": teacher_val["metric"] if teacher_val else None,
        "wall_seconds": round(totals["wall_seconds"], 3), "train_seconds": round(totals["train_seconds"], 3),
        "samples_per_second": round(totals["train_samples"] / max(totals["train_seconds"], 1e-9), 1),
        **_lm_summary(data, totals, best),
        "validation_split": data.selection.name, "selection_note": selection_note(data.selection.name),
        "teacher_array": (s.method.teacher_array if s.method.target_kind == "dense" else ",".join(s.method.arrays()))
        if data.train.cache is not None else None,
        "teacher_target": target_kind(data.train.cache) if data.train.cache is not None else None,
        **s.method.describe(), "hyperparameters": hp, "device": str(device), "finished": utc_now(),
        "startup_seconds": progress.get("startup_seconds"), "max_steps": cfg.max_steps,
        "stopped_at_step": progress.get("stopped_at_step"),
        "unchecked_rows": progress.get("unchecked_rows", 0),
        "unchecked_note": (f"--max-steps ended the run with {progress['unchecked_rows']:,} of "
                           f"{len(data.train.inputs):,} training rows not yet read, so not yet checked against the "
                           "cache: no model was kept (--check-first checks every row first)"
                           if progress.get("unchecked_rows") else None),
        "teacher_targets": progress.get("teacher_targets"), "world_size": s.world.size,
        "warnings": list(progress.get("warnings", [])),
        **_against_baseline(data, best, teacher_val, cfg.cache is None),
        **_reported(data, finished, best),
    }


def _lm_summary(data: RunData, totals: dict[str, Any], best: dict[str, Any] | None) -> dict[str, Any]:
    """A language model's training tokens/s and, at the best epoch, its perplexity and agreement with the teacher."""
    if data.kind != "lm":
        return {}
    lengths = data.train.inputs.split.dataset.lengths
    tokens = totals["train_samples"] * (float(np.mean(lengths)) if len(lengths) else 0.0)
    scores = (best or {}).get("scores") or {}
    return {"tokens_per_second": round(tokens / max(totals["train_seconds"], 1e-9), 1),
            "best_perplexity": scores.get("perplexity"), "best_agreement": scores.get("agreement")}


def _against_baseline(data: RunData, best: dict[str, Any] | None, teacher_val: dict | None,
                      training: bool) -> dict[str, Any]:
    """The constant predictor's score beside the run's best (and the cached teacher's), and a note when either is
    no better: a chance-level teacher or student is said, never left for the user to discover."""
    floor = baseline(data)
    metric, split, bar = primary_metric(data.task, data.kind), data.selection.name, clearly_better(floor["metric"])

    def no_better(value: float | None) -> bool | None:
        return None if value is None else not better(value, bar, data.kind) and value != bar

    student = no_better(best["metric"] if best else None)
    teacher = no_better(teacher_val["metric"] if teacher_val else None)
    said = [f"the {who} ({split} {metric} {value:.4f}) is not clearly better than {floor['predictor']} "
            f"({floor['metric']:.4f}; clearly better starts at {bar:.4f})"
            for who, value, bad in (("best model" if training else "best student", best and best["metric"], student),
                                    ("teacher in the cache", teacher_val and teacher_val["metric"], teacher))
            if bad]
    hint = ("a teacher at this level has nothing to teach (train a better one first)" if teacher else
            "check the learning rate and the number of epochs")
    return {"baseline_metric": floor["metric"], "baseline_predictor": floor["predictor"], "clearly_better_from": bar,
            "no_better_than_baseline": student, "teacher_no_better_than_baseline": teacher,
            "baseline_note": f"{'; '.join(said)}: {hint}" if said else None}


def _reported(data: RunData, finished: list[dict[str, Any]], best: dict[str, Any] | None) -> dict[str, Any]:
    """--report-split's score at the best epoch (the number to report: selected on validation, scored on test)
    and at the last."""
    if data.report is None:
        return {}
    at = {r["epoch"]: r.get("report_metric") for r in finished}
    return {"report_split": data.report.name, "report_metric_at_best": at.get(best["epoch"]) if best else None,
            "report_metric_last": finished[-1].get("report_metric") if finished else None}




__all__ = ["StudentRun", "attach_targets", "baseline", "build_run", "close_run", "load_data", "method_for",
           "open_folder", "open_run", "save_model", "snapshot", "targets_plan"]
