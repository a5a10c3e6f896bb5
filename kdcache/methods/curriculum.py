"""Curriculum extraction (Gupta & Karmalkar): one phase per projected teacher layer, shallow to deep, in which a
student layer is fitted through a linear read-out, with MSE, to that layer's cached random projection
(`hidden_<layer>`); then a final phase on the teacher's logits with vanilla KD or Continuation-KD (`--kd-loss`),
whose schedules run from that phase's first epoch. Only logits-phase epochs compete for best/.

On a language-model cache the projections are per token ([N, S, D]): the student's layer at every position goes
through its read-out, and the squared error is averaged over the window's real positions (padding masked); the
logits phase is the chunked per-token loss of the other methods (kdcache.methods.tokens).

Choices and their reasons: docs/methods.md ("Curriculum extraction").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.methods import losses, targets
from kdcache.methods.base import Method, Run, StepPlan
from kdcache.methods.prokd import both_defaults, inner_method
from kdcache.models import hidden
from kdcache.models.hidden import Layer, LayerTap

#: Share of the run given to the projection phases when --phase-epochs is not given; the rest trains on logits.
PROJECTION_FRACTION = 0.5


@dataclass
class Phase:
    """Epochs first..last (1-based, inclusive) fit `student_layer` to the projection of `teacher_layer`."""

    first: int
    last: int
    teacher_layer: Layer
    student_layer: Layer
    array: str


@dataclass
class CurriculumPlan:
    """The projection phases in order, then the logits phase (epochs `logits_from`..n)."""

    phases: list[Phase]
    logits_from: int
    n: int
    dim: int

    def phase_at(self, epoch: int) -> Phase | None:
        """The projection phase of `epoch`, or None in the final (logits) phase."""
        return next((p for p in self.phases if p.first <= epoch <= p.last), None)

    def describe(self) -> list[str]:
        lines = [f"epochs {p.first}-{p.last}: student layer {p.student_layer} <- projection of teacher layer "
                 f"{p.teacher_layer} ({p.array}, MSE)" for p in self.phases]
        return lines + [f"epochs {self.logits_from}-{self.n}: teacher logits"]


def _parse_map(spec: str, teacher_layers: list[Layer]) -> dict[Layer, Layer]:
    """`--layer-map 2:1,4:layers.1`: teacher layer (as stored) -> student layer number (from 1) or module name."""
    by_text = {str(t): t for t in teacher_layers}
    mapping: dict[Layer, Layer] = {}
    for item in spec.split(","):
        left, _, right = (part.strip() for part in item.partition(":"))
        if item.count(":") != 1 or not left or not right:
            raise KDCacheError(f"--layer-map {spec!r}: each item is TEACHER_LAYER:STUDENT_LAYER, got {item!r}")
        if left not in by_text:
            raise KDCacheError(f"--layer-map {spec!r}: teacher layer {left} has no stored projection "
                               f"(the cache projects {', '.join(map(str, teacher_layers))})")
        if by_text[left] in mapping:
            raise KDCacheError(f"--layer-map {spec!r}: teacher layer {left} is mapped twice")
        if right.isdigit() and int(right) < 1:
            raise KDCacheError(f"--layer-map {spec!r}: student layers count from 1, got {right}")
        mapping[by_text[left]] = int(right) if right.isdigit() else right
    return mapping


def default_layer_map(teacher_layers: list[Layer], student_layers: int | None, student: str) -> dict[Layer, Layer]:
    """Spread the projected teacher layers over the student's layers, deepest to deepest: the p-th of m (from 1)
    goes to student layer ceil(p * L / m). Needs m <= L, or names (--layer-map) for a student without numbering."""
    m = len(teacher_layers)
    if student_layers is None:
        raise KDCacheError(f"student {student} has no numbered layers to map the cache's {m} projected teacher layers "
                           f"({', '.join(map(str, teacher_layers))}) to; pass --layer-map TEACHER:MODULE,...")
    if m > student_layers:
        raise KDCacheError(f"student {student} has {student_layers} layer(s) but the cache projects {m} teacher layers "
                           f"({', '.join(map(str, teacher_layers))}): they cannot be mapped one to one; pass "
                           "--layer-map with fewer teacher layers (e.g. --layer-map "
                           f"{teacher_layers[-1]}:{student_layers})")
    return {t: math.ceil((p + 1) * student_layers / m) for p, t in enumerate(teacher_layers)}


def phase_lengths(spec: str | None, m: int, n: int) -> list[int]:
    """Epochs of each projection phase: `--phase-epochs 3,3` as given, else PROJECTION_FRACTION of n shared
    equally (at least one epoch each); at least one epoch must remain for the logits phase."""
    if spec:
        try:
            lengths = [int(x) for x in spec.split(",")]
        except ValueError:
            raise KDCacheError(f"--phase-epochs {spec!r}: expected comma-separated epoch counts, e.g. 5,5") from None
        if len(lengths) == 1 and m > 1:
            lengths = lengths * m
        if len(lengths) != m or min(lengths) < 1:
            raise KDCacheError(f"--phase-epochs {spec!r}: needs {m} positive epoch count(s), one per projected layer")
    else:
        lengths = [max(1, int(PROJECTION_FRACTION * n) // m)] * m
    if sum(lengths) >= n:
        raise KDCacheError(f"curriculum: the {m} projection phase(s) take {sum(lengths)} of {n} epochs, leaving none "
                           "for the teacher's logits; raise --epochs or shorten --phase-epochs")
    return lengths


def plan_curriculum(projections: dict[str, Any] | None, student_model: nn.Module, student: str, n: int,
                    layer_map: str | None, phase_epochs: str | None, where: str) -> CurriculumPlan:
    """Check that the cache's projections can train this student and lay out the phases."""
    if not projections:
        raise KDCacheError(f"{where}: stores no hidden-state projections, which --method curriculum trains on; cache "
                           "them with kdcache cache-teacher --hidden-layers 2,4,6 --proj-dim D")
    stored = hidden.parse_layers([str(x) for x in projections["layers"]])
    if layer_map:
        mapping = _parse_map(layer_map, stored)
    else:
        mapping = default_layer_map(stored, hidden.count_layers(student_model), student)
    teacher_layers = [t for t in stored if t in mapping]  # shallow to deep, as cached
    lengths = phase_lengths(phase_epochs, len(teacher_layers), n)
    phases, first = [], 1
    for t, length in zip(teacher_layers, lengths):
        phases.append(Phase(first, first + length - 1, t, mapping[t], projections["arrays"][str(t)]))
        first += length
    return CurriculumPlan(phases, first, n, int(projections["dim"]))


class ProjectionHeads(nn.Module):
    """What turns a pooled student layer into a D-vector to compare with a stored projection: a linear readout per
    phase, trained with the student and discarded after the run. Always a readout, even when the widths agree:
    the target is a signed Gaussian projection, which a post-activation layer (ReLU >= 0) cannot equal itself."""

    def __init__(self, widths: dict[str, int], dim: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({key: nn.Linear(width, dim) for key, width in widths.items()})

    def forward(self, key: str, pooled: torch.Tensor) -> torch.Tensor:
        return self.heads[key](pooled)


def student_tap(plan: CurriculumPlan, student_model: nn.Module, student: str, tokens: bool = False) -> LayerTap:
    """Hooks on the mapped student layers, one per phase in phase order (an unknown layer is a one-line error).
    `tokens`: a causal LM's layers at every position, its body run without its output projection."""
    return LayerTap(student_model, [p.student_layer for p in plan.phases], what=f"student {student}", tokens=tokens,
                    head=not tokens)


def head_key(phase: int) -> str:
    """The ProjectionHeads key of projection phase `phase` (0-based): one head per phase."""
    return f"phase{phase + 1}"


@dataclass
class TokenProjection:
    """A causal-LM student's projected layer for a batch of windows: [B, S, D], and each window's real tokens."""

    values: torch.Tensor
    lengths: torch.Tensor  # [B]

    def real(self) -> torch.Tensor:
        """[B, S] bool: the positions inside each window."""
        positions = torch.arange(self.values.shape[1], device=self.values.device)
        return positions[None, :] < self.lengths.to(self.values.device)[:, None]


class CurriculumExtraction(Method):
    name = "curriculum"
    accepts = ("checkpoint", "kd_loss", "phase_epochs", "layer_map")
    defaults = both_defaults()
    per_token = True  # a language-model cache stores its projections per token: fitted per position, masked
    # the logits phase reads the cache's target as its logit loss does: dense, or top-k (a language model's usual
    # cache); the projections are dense arrays of their own
    target_kinds = ("dense", "topk")

    def setup(self, run: Run) -> None:
        super().setup(run)
        self.inner = inner_method(self.options)
        run.hp["kd_loss"] = self.inner.name
        self.curriculum = plan_curriculum(run.cache.projections, run.student.model, run.student.spec, run.epochs,
                                          self.options.layer_map, self.options.phase_epochs, run.where)
        self.tap: LayerTap | None = student_tap(self.curriculum, run.student.model, run.student.spec,
                                                tokens=run.kind == "lm")
        with torch.inference_mode():  # one head per phase, sized by a forward pass on two rows
            _, pooled = self.tap(run.probe)
        widths = {head_key(i): int(p.shape[-1]) for i, p in enumerate(pooled)}
        self.heads = ProjectionHeads(widths, self.curriculum.dim).to(next(run.student.model.parameters()).device)
        self.inner.setup(run)

    def _served(self, array: str) -> tuple[str, ...]:
        """The arrays one phase reads: a projection, or the trained teacher's target (every array of a top-k one)."""
        sparse = array == self.teacher_array and self.target_kind != "dense"
        return targets.KIND_ARRAYS[self.target_kind] if sparse else (array,)

    def arrays(self) -> tuple[str, ...]:
        phases = (*dict.fromkeys(p.array for p in self.curriculum.phases), self.teacher_array)
        return tuple(a for array in phases for a in self._served(array))

    def epoch_arrays(self, epoch: int) -> tuple[str, ...]:
        return self._served(self.plan(epoch, (epoch - 1) * self.run.steps_per_epoch).array)

    def plan(self, epoch: int, step: int) -> StepPlan:
        phase = self.curriculum.phase_at(epoch)
        if phase is not None:
            index = self.curriculum.phases.index(phase)
            return StepPlan(phase.array, {"phase": index + 1, "layer": f"{phase.teacher_layer}->{phase.student_layer}"})
        before = self.curriculum.logits_from - 1  # the logits phase runs its own schedules, from its first epoch
        values = self.inner.values(epoch - before, step - before * self.run.steps_per_epoch, self.run.epochs - before)
        return StepPlan(self.teacher_array, {**values, "phase": len(self.curriculum.phases) + 1})

    def forward(self, student: Any, inputs: Any, plan: StepPlan) -> Any:
        if plan.values["phase"] > len(self.curriculum.phases):
            return super().forward(student, inputs, plan)  # logits (a causal LM's per-chunk TokenOutput)
        index = plan.values["phase"] - 1
        _, pooled = self.tap(inputs)
        projected = self.heads(head_key(index), pooled[index])
        if self.run.kind == "lm":
            return TokenProjection(projected, inputs["attention_mask"].sum(dim=1))
        return projected

    def step_loss(self, output: Any, target: Any, labels: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        if isinstance(output, TokenProjection):  # a projection phase of a causal-LM student: per token, masked
            return losses.token_projection_loss(output.values, target, output.real())
        return super().step_loss(output, target, labels, plan)

    def loss(self, output: torch.Tensor, target: torch.Tensor | None, labels: torch.Tensor,
             plan: StepPlan, mask: torch.Tensor | None = None) -> torch.Tensor:
        if plan.values["phase"] > len(self.curriculum.phases):
            return self.inner.loss(output, target, labels, plan, mask=mask)
        return losses.projection_loss(output, target)

    def start_epoch(self, epoch: int, student: Any) -> None:
        if self.tap is not None and self.curriculum.phase_at(epoch) is None:
            self.tap.close()  # the projection phases are over: no more hooks on the student
            self.tap = None

    def eligible(self, epoch: int) -> bool:
        return self.curriculum.phase_at(epoch) is None  # the head is untrained until the logits phase

    def modules(self) -> nn.Module:
        return self.heads

    def identity(self) -> dict[str, Any]:
        projections = self.run.cache.projections or {}
        return {**super().identity(), "projections": {k: projections.get(k) for k in ("layers", "dim", "seed", "widths")}}

    def describe(self) -> dict[str, Any]:
        return {"curriculum": self.curriculum.describe()}
