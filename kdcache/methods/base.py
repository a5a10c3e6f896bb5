"""What a distillation method is to the training loop: one object that says what to read, what is in effect at each
step, and what the loss is. The loop never asks a method its name.

A method is set up once per run (`setup`, with the run's hyper-parameters, epochs, steps and cache), then asked
at each step for its `plan` (the cached array the step's target comes from, and the values the loss uses: T, phi,
psi, alpha, stage, checkpoint, phase), for the model output the loss compares (`forward`: the student's logits,
or a projection of one of its layers) and for the `loss`. Hooks at epoch boundaries let a method keep state
(Annealing-KD's best stage-1 student) or change the model (curriculum extraction removes its layer hooks); that
state travels in last.pt through `state_dict`.

A new method is one module here and one line in `kdcache/methods/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.methods import targets, tokens


@dataclass
class MethodOptions:
    """The method-specific flags of a run (None: not given); each method declares which it accepts."""

    checkpoint: str | None = None  # distil from this cached teacher checkpoint instead of the trained teacher
    kd_loss: str | None = None  # prokd / curriculum's logits phase: vanilla (default) or continuation
    phase_epochs: str | None = None  # curriculum: epochs per projection phase; prokd: per checkpoint
    layer_map: str | None = None  # curriculum: teacher layer -> student layer
    reduction: str = "sample"  # continuation's hinge reduction; annealing's stage 1 mean over outputs (docs/methods.md)
    anneal_continuous: bool | None = None  # annealing: stage 2 keeps stage 1's optimiser and schedule (not the authors')
    phi_on: str | None = None  # continuation: what phi anneals, both (Eq. 4) | teacher | margin | none (Table 7)
    topk_tail: str | None = None  # vanilla on a top-k cache: the tail one exact bucket (default) | renormalised away

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None and k != "reduction"}


@dataclass
class Run:
    """What a method is set up with, fixed before the first step."""

    hp: dict[str, Any]  # the resolved hyper-parameters (preset, method defaults, flags)
    epochs: int
    steps_per_epoch: int
    unit: str  # "epoch" or "step": when the schedules move
    kind: str  # "classification", "regression", or "lm" (a causal-LM student on a token-level cache)
    cache: Any = None  # the train split's TeacherCache; None for `kdcache train`
    student: Any = None  # kdcache.models.Student
    probe: Any = None  # model input for two training rows, on the training device (to size extra modules)
    where: str = ""  # the cache's name, for messages
    loss_chunk: int | None = None  # "lm": positions whose logits are made at once (kdcache.methods.tokens)


@dataclass
class StepPlan:
    """What is in effect for one optimiser step: the cached array its target comes from, and the values the loss
    uses (also recorded per epoch in metrics.jsonl)."""

    array: str | None
    values: dict[str, Any] = field(default_factory=dict)


class Method:
    """The interface (and the defaults) every method implements; see the module docstring."""

    name: ClassVar[str]
    #: whether the method reads a teacher cache (every one but `ce`)
    needs_cache: ClassVar[bool] = True
    #: the MethodOptions fields this method accepts (besides `reduction`, which only continuation and annealing use)
    accepts: ClassVar[tuple[str, ...]] = ("checkpoint",)
    #: what to say when a flag this method does not accept is given, when the generic line would mislead
    refusals: ClassVar[dict[str, str]] = {}
    #: this method's own hyper-parameters per preset (the training ones live in kdcache/presets.py)
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    #: the kinds of teacher target (kdcache.methods.targets) this method's loss can use
    target_kinds: ClassVar[tuple[str, ...]] = ("dense",)
    #: whether the method trains causal-LM students on a token-level cache (its loss applied per token)
    per_token: ClassVar[bool] = False

    def __init__(self, options: MethodOptions | None = None) -> None:
        self.options = options or MethodOptions()
        self.teacher_array = "logits"
        self.target_kind = "dense"

    # --- before any work ---------------------------------------------------------------------------------------

    @classmethod
    def preset_defaults(cls, preset: str) -> dict[str, Any]:
        """This method's hyper-parameters under `preset` (merged by kdcache.train.config.resolve)."""
        return dict(cls.defaults.get(preset, {}))

    @classmethod
    def fit_schedules(cls, values: dict[str, Any], given: frozenset[str], preset_epochs: int,
                      absolute: bool) -> list[str]:
        """Fit this method's preset schedules to a run of values["epochs"] epochs, in place (flags the user gave,
        `given`, are kept); returns one phrase per change, for the run's log line and summary. None by default."""
        return []

    def setup(self, run: Run) -> None:
        """Fix everything the run's steps depend on, checking it against the cache (a one-line error otherwise)."""
        self.run = run
        if self.options.checkpoint is not None and run.cache is not None:
            self.teacher_array = run.cache.checkpoint_array(self.options.checkpoint)  # checkpoints are dense logits
        elif run.cache is not None and self.needs_cache:
            self.target_kind = targets.target_kind(run.cache)
            targets.check_kind(self.target_kind, self.target_kinds, self.name, run.where)

    def arrays(self) -> tuple[str, ...]:
        """Every cached array the run reads (served by the batches): the target's arrays."""
        if self.target_kind != "dense":
            return targets.KIND_ARRAYS[self.target_kind]
        return (self.teacher_array,)

    def restart_epochs(self) -> tuple[int, ...]:
        """Epochs at which the optimiser and its learning-rate schedule start afresh, each phase trained as its own
        run (Annealing-KD's stage 2, as its authors train it); none by default."""
        return ()

    def epoch_arrays(self, epoch: int) -> tuple[str, ...]:
        """The arrays one epoch reads: those of its first step (every array of a sparse target)."""
        if self.target_kind != "dense":
            return targets.KIND_ARRAYS[self.target_kind]
        plan = self.plan(epoch, (epoch - 1) * self.run.steps_per_epoch)
        return (plan.array,) if plan.array is not None else ()

    def identity(self) -> dict[str, Any]:
        """What the run reads beyond the trained teacher's logits, by content (checkpoint hashes, projection
        settings), so a cache rebuilt at the same path cannot be resumed into."""
        if self.options.checkpoint is None or self.run.cache is None:
            return {}
        by_name = {c.get("name"): c.get("sha256") for c in self.run.cache.checkpoints}
        return {"checkpoint_sha256": by_name.get(self.options.checkpoint)}

    # --- each step ------------------------------------------------------------------------------------------------

    def plan(self, epoch: int, step: int) -> StepPlan:
        """What is in effect at optimiser step `step` (0-based over the run) of epoch `epoch` (from 1)."""
        return StepPlan(self.teacher_array, self.values(epoch, step, self.run.epochs))

    def values(self, epoch: int, step: int, n: int) -> dict[str, Any]:
        """The schedule's values at (epoch, step) of a run of n epochs (T, phi, psi, alpha, stage, ...)."""
        return {}

    def target_of(self, served: Any, plan: StepPlan) -> Any:
        """The step's target from the batch's served arrays: the typed value of the cache's kind
        (kdcache.methods.targets) where the plan reads the trained teacher of a sparse cache, else the plan's array
        (a tensor: dense logits, a checkpoint's, a projection)."""
        if self.target_kind != "dense" and plan.array == self.teacher_array:
            return targets.served_target(self.run.cache, served)
        return served[plan.array] if isinstance(served, dict) else served

    @property
    def loss_kind(self) -> str:
        """The task kind the row losses see: a token of a language model is a row of a classification over its
        vocabulary."""
        return "classification" if self.run.kind == "lm" else self.run.kind

    def forward(self, student: Any, inputs: Any, plan: StepPlan) -> Any:
        """What the loss compares with the step's target: the student's logits; for a causal-LM student its final
        hidden states and output projection (`kdcache.methods.tokens.TokenOutput`), the logits made per chunk."""
        if self.run.kind == "lm":
            return tokens.token_output(student.model, inputs)
        return student(inputs)

    def step_loss(self, output: Any, target: Any, labels: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """The step's loss: `loss` itself, or for a causal-LM student `loss` at every real token, averaged over
        them, the logits made a chunk of positions at a time (`kdcache.methods.tokens.chunked_loss`)."""
        if isinstance(output, tokens.TokenOutput):
            return tokens.chunked_loss(output, target, labels,
                                       lambda z, t, y, m: self.loss(z, t, y, plan, mask=m),
                                       chunk=self.run.loss_chunk)
        return self.loss(output, target, labels, plan)

    def loss(self, output: torch.Tensor, target: torch.Tensor | None, labels: torch.Tensor,
             plan: StepPlan, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of a batch of rows; `mask` (R,) bool keeps the rows that count (a token-level batch's real
        positions), the others' labels being -1 already."""
        raise NotImplementedError

    # --- epochs, state ----------------------------------------------------------------------------------------------

    def advice(self) -> str | None:
        """A note for a run the method is known to do badly in (after `setup`, which knows the run's length), so a
        user learns it at the start rather than from the table; None when there is nothing to say."""
        return None

    def start_epoch(self, epoch: int, student: Any) -> None:
        """Called before an epoch's first step."""

    def end_epoch(self, epoch: int, student: Any, metric: float) -> None:
        """Called after an epoch's evaluation with its validation metric."""

    def eligible(self, epoch: int) -> bool:
        """Whether this epoch's student may become the run's best (not while a head is untrained)."""
        return True

    def modules(self) -> nn.Module | None:
        """Trainable modules beside the student (optimised with it, saved in last.pt, discarded afterwards)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        modules = self.modules()
        return {"modules": modules.state_dict()} if modules is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        modules = self.modules()
        if modules is not None:
            modules.load_state_dict(state["modules"])

    def describe(self) -> dict[str, Any]:
        """What the run's summary records about the method beyond its hyper-parameters."""
        return {}

    def display_name(self, kind: str) -> str:
        """How reports name the method's objective."""
        return self.name


def check_options(method: type[Method], options: MethodOptions, registry: dict[str, type[Method]]) -> None:
    """A method-specific flag given to a method that does not use it is an error naming who does use it."""
    flags = {"checkpoint": "--checkpoint", "kd_loss": "--kd-loss", "phase_epochs": "--phase-epochs",
             "layer_map": "--layer-map", "anneal_continuous": "--anneal-continuous", "phi_on": "--phi-on",
             "topk_tail": "--topk-tail"}
    for name in options.given():
        if name in method.accepts:
            continue
        if name in method.refusals:
            raise KDCacheError(method.refusals[name])
        users = sorted(m.name for m in registry.values() if name in m.accepts)
        raise KDCacheError(f"{flags[name]} applies to --method {' and '.join(users)} only")


__all__ = ["Method", "MethodOptions", "Run", "StepPlan", "check_options"]
