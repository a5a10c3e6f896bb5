"""A method as a plain object for other people's training loops: its loss and its schedule values at any (epoch,
step), with no kdcache loop around it.

`get("continuation", preset="glue", epochs=30, cache=...)` sets up the very `Method` that `distill` runs (same
defaults per preset, same schedules, same losses: nothing here computes a loss of its own), then
`.loss(student_logits, batch, labels, epoch=e, step=s)` reads the step's target from the batch's `teacher_*`
keys (what `kdcache.torch.with_targets` serves) and `.values(epoch, step)` gives T, phi, psi, alpha, the stage,
the Pro-KD checkpoint.
"""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace
from typing import Any

import torch

from kdcache.errors import KDCacheError
from kdcache.methods import targets, tokens
from kdcache.methods.base import MethodOptions, Run, StepPlan
from kdcache.presets import TRAINING_PRESETS

#: Prefix of the keys that carry a cache's arrays in a batch (`teacher_logits`, `teacher_topk_values`, ...).
TEACHER_PREFIX = "teacher_"
#: The training presets a method's own defaults are kept for (kdcache/presets.py holds the training values).
PRESETS = ("cifar", "glue", "small", "lm")
#: Methods whose steps need what only kdcache's loop has (a student's layers tapped, projection heads trained).
LOOP_ONLY = {"curriculum": "curriculum extraction taps the student's layers and trains projection heads beside it; "
                           "run it with kdcache distill --method curriculum"}


class KDMethod:
    """One method set up for one run of `epochs` epochs: the schedule values and the loss at each (epoch, step),
    and the state to save beside a checkpoint (see the module docstring)."""

    def __init__(self, method: Any, run: Run) -> None:
        self.method, self.run = method, run
        self.name: str = method.name
        #: the resolved hyper-parameters: the preset's values for this method, then the ones given
        self.hyperparameters: dict[str, Any] = run.hp
        self.epochs, self.steps_per_epoch = run.epochs, run.steps_per_epoch

    @property
    def arrays(self) -> tuple[str, ...]:
        """The cached arrays the method reads over the run (`teacher_` + each name is a batch key)."""
        return self.method.arrays()

    def restart_epochs(self) -> tuple[int, ...]:
        """Epochs at which the method wants a fresh optimiser and learning-rate schedule (Annealing-KD's stage 2)."""
        return self.method.restart_epochs()

    def plan(self, epoch: int, step: int | None = None) -> StepPlan:
        """What is in effect at optimiser step `step` (0-based over the run; default: the epoch's first) of epoch
        `epoch` (from 1): the array read and the schedule values."""
        self._check_epoch(epoch)
        return self.method.plan(epoch, (epoch - 1) * self.steps_per_epoch if step is None else int(step))

    def values(self, epoch: int, step: int | None = None) -> dict[str, Any]:
        """The schedule's values there: T, phi, psi (continuation), T, alpha (vanilla), stage (annealing),
        checkpoint (Pro-KD)."""
        return dict(self.plan(epoch, step).values)

    def target(self, batch: Any, plan: StepPlan) -> Any:
        """The step's teacher target out of a batch: its `teacher_*` keys (a dict), or the target itself (a tensor
        of dense logits or a typed target of kdcache.methods.targets), as the plan reads it."""
        if isinstance(batch, (torch.Tensor, targets.DenseTarget, targets.TopKTarget, targets.SampledTarget)):
            if isinstance(batch, targets.DenseTarget):
                return batch.logits
            return batch
        if not isinstance(batch, dict):
            raise KDCacheError(f"method {self.name}: targets must be a batch dict with teacher_* keys or a tensor, "
                               f"not {type(batch).__name__}")
        wanted = self.method.epoch_arrays(1) if plan.array is None else self._served(plan.array)
        missing = [TEACHER_PREFIX + name for name in wanted if TEACHER_PREFIX + name not in batch]
        if missing:
            have = ", ".join(k for k in batch if k.startswith(TEACHER_PREFIX)) or "none"
            raise KDCacheError(f"method {self.name}: the batch has no {', '.join(missing)} (teacher keys: {have}); "
                               "serve the rows with kdcache.torch.with_targets over the same cache")
        served = {name: batch[TEACHER_PREFIX + name] for name in wanted}
        return self.method.target_of(served if len(served) > 1 else next(iter(served.values())), plan)

    def _served(self, array: str) -> tuple[str, ...]:
        if array == self.method.teacher_array and self.method.target_kind != "dense":
            return targets.KIND_ARRAYS[self.method.target_kind]
        return (array,)

    def loss(self, student_output: torch.Tensor, targets_or_batch: Any, labels: torch.Tensor, *, epoch: int,
             step: int | None = None) -> torch.Tensor:
        """The method's loss for one batch at (epoch, step): `student_output` (B, C) logits, the batch (or its
        target), labels (B,). A student of another width than the cache's teacher is one line. On a language-model
        cache `student_output` is a causal LM's `kdcache.methods.tokens.TokenOutput` and `labels` each window's
        next token (`teacher_next_token`): the loss is `distill`'s, chunked, the mean over real tokens."""
        plan = self.plan(epoch, step)
        target = self.target(targets_or_batch, plan) if plan.array is not None else None
        if isinstance(student_output, tokens.TokenOutput):
            width = int(getattr(student_output.head, "out_features", 0) or student_output.hidden.shape[-1])
            expected = self._width(None)
            if expected is not None and width != expected:
                raise KDCacheError(f"the student's vocabulary has {width} tokens but {self._where()} has {expected} "
                                   "outputs; a student must read the teacher's token ids")
            return self.method.step_loss(student_output, target, labels, plan)
        if self.run.kind == "lm":
            raise KDCacheError(f"{self._where()} is a language model's (targets per token): give the loss "
                               "kdcache.methods.tokens.token_output(model, batch), not logits")
        width = int(student_output.shape[-1])
        expected = self._width(target)
        if expected is not None and width != expected:
            raise KDCacheError(f"the student has {width} outputs but {self._where()} has {expected}; give the student "
                               f"{expected} outputs (num_labels={expected})")
        return self.method.loss(student_output, target, labels, plan)

    def _width(self, target: Any) -> int | None:
        if self.run.cache is not None:
            return int(self.run.cache.num_outputs)
        return int(target.shape[-1]) if isinstance(target, torch.Tensor) else None

    def _where(self) -> str:
        cache = self.run.cache
        return f"the cache {cache.path}/{cache.split}'s teacher" if cache is not None else "the teacher's target"

    def _check_epoch(self, epoch: int) -> None:
        if not 1 <= int(epoch) <= self.epochs:
            raise KDCacheError(f"method {self.name}: epoch {epoch} is outside the run's epochs 1..{self.epochs}")

    # --- epochs and state, for loops that keep them -----------------------------------------------------------

    def start_epoch(self, epoch: int, model: torch.nn.Module) -> None:
        """Before an epoch's first step (Annealing-KD's stage 2 starts from the best stage-1 weights)."""
        self.method.start_epoch(epoch, SimpleNamespace(model=model))

    def end_epoch(self, epoch: int, model: torch.nn.Module, metric: float) -> None:
        """After an epoch's evaluation, with its validation metric (higher is better; a language model's perplexity,
        on a cache of kind "lm", lower: kdcache.names.better)."""
        self.method.end_epoch(epoch, SimpleNamespace(model=model), float(metric))

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the model and optimiser (tensors and plain values only)."""
        return {"name": self.name, "epochs": self.epochs, "hyperparameters": dict(self.hyperparameters),
                "method": self.method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The state `state_dict` saved; a state of another method or run length is one line."""
        saved = (state.get("name"), state.get("epochs"))
        if saved != (self.name, self.epochs):
            raise KDCacheError(f"the saved method state is {saved[0]} over {saved[1]} epochs, not {self.name} over "
                               f"{self.epochs}: resume with the same method and epochs")
        self.method.load_state_dict(state["method"])

    def __repr__(self) -> str:
        return f"KDMethod({self.name!r}, epochs={self.epochs}, hyperparameters={self.hyperparameters})"


def get(name: str, *, epochs: int, preset: str = "glue", cache: Any = None, steps_per_epoch: int = 1,
        unit: str = "epoch", kind: str | None = None, absolute_schedules: bool = False,
        loss_chunk: int | None = None, **options: Any) -> KDMethod:
    """The method `distill --method NAME` runs, as a plain object for another training loop (see the module
    docstring). `options` are the method's hyper-parameters (t_max, psi, margin, temperature, alpha,
    anneal_epochs, ...) and its flags (kd_loss, phi_on, phase_epochs, reduction, anneal_continuous, checkpoint);
    `cache` (a TeacherCache) is needed for sparse targets and Pro-KD's checkpoints, and checks the method against
    the kind of target the cache stores. The preset's schedules are fitted to `epochs` as `distill` fits them
    (`absolute_schedules=True` keeps the preset's absolute epochs, as `--absolute-schedules`); `loss_chunk`: on a
    language-model cache, the positions whose logits are made at once (`--loss-chunk`, default 2**24 / V)."""
    from kdcache.methods.registry import make_method, method_class

    if name in LOOP_ONLY:
        raise KDCacheError(f"method {name!r} is not available as a plain object: {LOOP_ONLY[name]}")
    cls = method_class(name)
    if preset not in PRESETS:
        raise KDCacheError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    if int(epochs) < 1 or int(steps_per_epoch) < 1:
        raise KDCacheError("epochs and steps_per_epoch must be at least 1")
    if loss_chunk is not None and int(loss_chunk) < 1:
        raise KDCacheError(f"loss_chunk must be at least 1, got {loss_chunk}")
    if unit not in ("epoch", "step"):
        raise KDCacheError(f"unit {unit!r} is not one of epoch, step")
    flag_names = {f.name for f in fields(MethodOptions)}
    flags = {k: v for k, v in options.items() if k in flag_names}
    hp = {**cls.preset_defaults(preset), "anneal_epochs": None}
    unknown = sorted(k for k in options if k not in flag_names and k not in hp)
    if unknown:
        known = sorted(set(hp) | flag_names)
        raise KDCacheError(f"method {name!r} takes no option {', '.join(unknown)} (it takes {', '.join(known)})")
    hp.update({k: v for k, v in options.items() if k not in flag_names})
    # the preset's schedules fitted to a run of `epochs`, as distill fits them (train/config.py `settings`)

    values = {**hp, "epochs": int(epochs)}
    given = frozenset(k for k in options if k not in flag_names)
    cls.fit_schedules(values, given, int(TRAINING_PRESETS[preset]["epochs"]), absolute_schedules)
    hp = {k: v for k, v in values.items() if k != "epochs"}
    method = make_method(name, MethodOptions(**flags))
    if cache is None and (name == "prokd" or flags.get("checkpoint")):
        raise KDCacheError(f"method {name!r} reads the cache's teacher checkpoints: pass cache=open_cache(...)")
    kind = kind or (cache.task_kind if cache is not None else "classification")
    where = f"{cache.path}/{cache.split}" if cache is not None else "the cache"
    run = Run(hp, int(epochs), int(steps_per_epoch), unit, kind, cache, where=where,
              loss_chunk=int(loss_chunk) if loss_chunk is not None else None)
    method.setup(run)
    return KDMethod(method, run)


__all__ = ["KDMethod", "LOOP_ONLY", "TEACHER_PREFIX", "get"]
