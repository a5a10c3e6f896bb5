"""Distillation losses: pure functions of logits and labels, one per method (see docs/methods.md).

Shapes, for a batch of B samples and a task with C outputs (C = 1 for regression):

- `student_logits`: (B, C) float, the student's outputs, carrying the graph to back-propagate through;
- `teacher_logits`: (B, C) float (a float16 cache is fine), the cached teacher's outputs for the same rows;
  they are a fixed target: every loss detaches them;
- `labels`: (B,) int64 class ids with -1 = no label (classification), or float with NaN = no label
  (regression, e.g. STS-B).

Every loss returns a scalar tensor computed in at least float32 (float16 caches and autocast outputs are
upcast first, so a squared norm of large logits cannot overflow), connected to `student_logits` even where
its value is a constant 0, so `loss.backward()` always works.

Rows without a label still count for the teacher terms: the teacher has an opinion on every row. The label
terms average over the labelled rows only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdcache.errors import KDCacheError

KINDS = ("classification", "regression")
REDUCTIONS = ("sample", "batch", "element", "mse")
#: reductions with one hinge on the whole batch's mean: a process holding a share of the batch cannot compute them
WHOLE_BATCH = ("batch", "mse")


# --- checks and shared pieces -------------------------------------------------------------------------

def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise KDCacheError(f"unknown task kind {kind!r}: expected one of {', '.join(KINDS)}")


def _check_unit(name: str, value: float) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise KDCacheError(f"{name} must be in [0, 1], got {value}")
    return value


def _as_float(logits: torch.Tensor) -> torch.Tensor:
    """Upcast float16/bfloat16 to float32 (float64 stays float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _student_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if student_logits.shape != teacher_logits.shape:
        raise KDCacheError(
            f"student outputs {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape: is the cache from a teacher of another task?")
    if student_logits.dim() != 2:
        raise KDCacheError(f"logits must be (batch, outputs), got shape {tuple(student_logits.shape)}")
    z_s = _as_float(student_logits)
    return z_s, teacher_logits.detach().to(z_s.dtype)


def _squared_distance(z_s: torch.Tensor, z_t: torch.Tensor, phi: float) -> torch.Tensor:
    """(B,) ||z_S - phi z_T||_2^2 per sample, summed over the C outputs."""
    return (z_s - phi * z_t).pow(2).sum(dim=-1)


def continuation_hinge(distance: torch.Tensor, *, outputs: int, allowed: float, reduction: str,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Continuation-KD's L_CNT from the per-row squared distances, so a sparse target that computes its own
    distance (`kdcache.methods.sparse_losses`) shares the dense loss's hinge and reductions exactly.

    Args:
        distance: (B,) d_b, summed over the C outputs.
        outputs: C, the divisor of `element` and `mse`.
        allowed: m phi, the hinge's tolerance.
        reduction: "sample", "batch", "element" or "mse" (see `continuation_kd_loss`).
        mask: (B,) bool, the rows that count (token-level: the valid positions); None: all B rows.
    """
    if reduction in ("element", "mse"):
        distance = distance / outputs
    if reduction in ("sample", "element"):
        return masked_mean(torch.clamp(distance - allowed, min=0), mask)
    return torch.clamp(masked_mean(distance, mask) - allowed, min=0)


def _masked_labels(labels: torch.Tensor, mask: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Labels of the rows `mask` drops become missing (-1, or NaN for regression), so the label term skips them."""
    if mask is None:
        return labels
    missing = torch.full_like(labels, -1) if kind == "classification" else torch.full_like(labels, float("nan"))
    return torch.where(mask, labels, missing)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B,) -> scalar: the mean over the rows `mask` keeps (0 when it keeps none), without a host sync."""
    if mask is None:
        return values.mean()
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return kept / mask.sum().clamp(min=1).to(values.dtype)


# --- losses -----------------------------------------------------------------------------------------

def ce(student_logits: torch.Tensor, labels: torch.Tensor, *, kind: str = "classification") -> torch.Tensor:
    """Hard-label loss, averaged over the labelled rows (0 when none is labelled).

    classification: CE = (1/|L|) sum_{b in L} -log softmax(z_S[b])[y_b],   L = {b : y_b != -1}
    regression:     MSE = (1/|L|) sum_{b in L} (z_S[b] - y_b)^2,           L = {b : y_b is not NaN}

    Args:
        student_logits: (B, C) for classification; (B, 1) or (B,) for regression (squeezed to (B,)).
        labels: (B,) int64 class ids, -1 = missing (classification); float targets, NaN = missing (regression).
        kind: "classification" or "regression".
    """
    _check_kind(kind)
    z_s = _as_float(student_logits)
    # No boolean-mask indexing (its data-dependent shape makes the host wait for the device): missing labels are
    # ignored by cross-entropy's ignore_index, or zeroed in the squared error.
    if kind == "classification":
        present = labels != -1
        total = F.cross_entropy(z_s, labels.long(), ignore_index=-1, reduction="sum")
    else:
        prediction = z_s.squeeze(-1)
        target = labels.to(prediction.dtype)
        present = ~torch.isnan(target)
        total = torch.where(present, prediction - torch.nan_to_num(target), 0.0).pow(2).sum()
    # A sum over no rows is 0 and still in the graph; dividing by max(count, 1) on the device avoids a host sync.
    return total / present.sum().clamp(min=1).to(total.dtype)


def vanilla_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                    temperature: float, alpha: float, kind: str = "classification",
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton et al. (2015), Eq. 1 of the Continuation-KD paper, with the usual T^2 gradient scaling.

    classification: L = alpha * CE(z_S, y) + (1 - alpha) * T^2 * KL(softmax(z_T / T) || softmax(z_S / T))
        KL(p || q) = (1/B) sum_b sum_c p[b,c] (log p[b,c] - log q[b,c])   ("batchmean": over all B rows)
    regression:     L = alpha * MSE(z_S, y) + (1 - alpha) * (1/B) sum_b (z_S[b] - z_T[b])^2
        A single real output has no distribution to soften, so the KL term becomes the MSE between student
        and teacher outputs; `temperature` is then unused (no T^2 factor either: it only compensates for the
        1/T^2 that softening puts on the KL gradient).

    Args:
        student_logits: (B, C); (B, 1) for regression.
        teacher_logits: (B, C), same shape as `student_logits`.
        labels: (B,) as in `ce`.
        temperature: T > 0, the softening temperature.
        alpha: weight of the hard-label term, in [0, 1] (alpha = 1: plain `ce`; alpha = 0: teacher only).
        kind: "classification" or "regression".
        mask: (B,) bool, the rows that count (token-level: the real positions), or None for all of them; the
            teacher term averages over them, and the label term skips the others.
    """
    _check_kind(kind)
    alpha = _check_unit("alpha", alpha)
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise KDCacheError(f"temperature must be a positive number, got {temperature}")
    z_s, z_t = _student_teacher(student_logits, teacher_logits)
    labels = _masked_labels(labels, mask, kind)
    if alpha == 1.0:
        return ce(student_logits, labels, kind=kind)
    if kind == "classification":
        log_q = F.log_softmax(z_s / temperature, dim=-1)
        log_p = F.log_softmax(z_t / temperature, dim=-1)
        if mask is None:
            soft = temperature ** 2 * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
        else:
            per_row = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)
            soft = temperature ** 2 * masked_mean(per_row, mask)
    else:
        soft = masked_mean((z_s - z_t).pow(2).sum(dim=-1), mask)
    if alpha == 0.0:
        return soft
    return alpha * ce(student_logits, labels, kind=kind) + (1.0 - alpha) * soft


def hinge_settings(reduction: str, phi: float, psi: float, phi_margin: float | None,
                   margin: float) -> tuple[float, float, float, float]:
    """The continuation hinge's settings checked once for its dense and sparse forms: (phi, psi, the margin's phi,
    margin), or one line naming the bad one."""
    if reduction not in REDUCTIONS:
        raise KDCacheError(f"unknown reduction {reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    phi = _check_unit("phi", phi)
    psi = _check_unit("psi", psi)
    phi_m = phi if phi_margin is None else _check_unit("phi_margin", phi_margin)
    margin = float(margin)
    if not (margin >= 0 and math.isfinite(margin)):
        raise KDCacheError(f"margin must be a non-negative number, got {margin}")
    return phi, psi, phi_m, margin


def continuation_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                         phi: float, psi: float, margin: float, reduction: str = "sample",
                         kind: str = "classification", phi_margin: float | None = None,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Continuation-KD (Jafari et al., 2022), Eqs. 3-4: a hinge on the distance to the annealed teacher.

    L = psi * CE(z_S, y) + (1 - psi) * L_CNT, with d_b = ||z_S[b] - phi z_T[b]||_2^2 = sum_c (z_S - phi z_T)[b,c]^2
    and, by `reduction`:
        "sample"  (default): L_CNT = (1/B) sum_b max(0, d_b - m phi)       hinge per sample (Eq. 4 per example)
        "batch":             L_CNT = max(0, (1/B) sum_b d_b - m phi)       one hinge on the batch mean
        "element":           L_CNT = (1/B) sum_b max(0, d_b / C - m phi)   per-output MSE, hinge per sample
        "mse":               L_CNT = max(0, (1/(B C)) sum_b d_b - m phi)   the authors' code: F.mse_loss, one hinge
    For regression CE is the MSE to the labels; L_CNT is unchanged (it already regresses outputs, C = 1).

    psi = 0 computes no label term at all (a batch of unlabelled rows is fine); psi = 1 computes no teacher
    term (L = CE). Either way the result stays connected to `student_logits`.

    Args:
        student_logits: (B, C); (B, 1) for regression.
        teacher_logits: (B, C), same shape.
        labels: (B,) as in `ce`.
        phi: phi(T_i) = 1 - (T_i - 1) / T_max in [0, 1] (`kdcache.schedules.phi`); scales teacher and margin.
        psi: psi(i) in [0, 1] (`kdcache.schedules.psi`), the weight of the hard-label term.
        margin: m >= 0, the hinge margin before annealing by phi.
        reduction: "sample", "batch", "element" or "mse" (see above).
        kind: "classification" or "regression".
        phi_margin: the margin's coefficient when it differs from the teacher's (`phi`): the paper's Table 7
            ablation anneals one and fixes the other at 1. None: `phi`, as Eq. 4.
        mask: (B,) bool, the rows that count, or None for all of them (as `vanilla_kd_loss`).
    """
    _check_kind(kind)
    phi, psi, phi_m, margin = hinge_settings(reduction, phi, psi, phi_margin, margin)
    z_s, z_t = _student_teacher(student_logits, teacher_logits)
    labels = _masked_labels(labels, mask, kind)
    if psi == 1.0:
        return ce(student_logits, labels, kind=kind)
    hinge = continuation_hinge(_squared_distance(z_s, z_t, phi), outputs=z_s.shape[-1], allowed=margin * phi_m,
                               reduction=reduction, mask=mask)
    if psi == 0.0:
        return hinge
    return psi * ce(student_logits, labels, kind=kind) + (1.0 - psi) * hinge


def annealing_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, phi: float,
                      mean_outputs: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Annealing-KD (Jafari et al., 2021) stage 1, Eq. 2: regress the student onto the annealed teacher.

    L = (1/B) sum_b ||z_S[b] - phi z_T[b]||_2^2, the squared norm summed over the C outputs; no label term.
    `mean_outputs` divides by C: the authors' code (F.mse_loss, a mean over batch and outputs).
    Stage 2 is plain `ce` on the hard labels.

    Args:
        student_logits: (B, C).
        teacher_logits: (B, C), same shape.
        phi: phi(T_i) = 1 - (T_i - 1) / T_max in [0, 1] (`kdcache.schedules.phi`).
        mean_outputs: average over the C outputs instead of summing them.
        mask: (B,) bool, the rows that count, or None for all of them.
    """
    phi = _check_unit("phi", phi)
    z_s, z_t = _student_teacher(student_logits, teacher_logits)
    loss = masked_mean(_squared_distance(z_s, z_t, phi), mask)
    return loss / z_s.shape[-1] if mean_outputs else loss


def projection_loss(student_projection: torch.Tensor, teacher_projection: torch.Tensor) -> torch.Tensor:
    """Curriculum extraction's phase loss: mean squared error between the student layer (through its projection
    head) and the cached random projection of the teacher layer, averaged over the B x D elements, so its scale
    does not grow with --proj-dim.

    Args:
        student_projection: (B, D), the pooled student layer after its head (`kdcache.curricula.ProjectionHeads`).
        teacher_projection: (B, D), from the cache (`hidden_<layer>`), never differentiated.
    """
    z_s, z_t = _student_teacher(student_projection, teacher_projection)
    return torch.nn.functional.mse_loss(z_s, z_t)


def token_projection_loss(student_projection: torch.Tensor, teacher_projection: torch.Tensor,
                          real: torch.Tensor) -> torch.Tensor:
    """Curriculum extraction's phase loss for a language model: the squared error of every real position's D-vector,
    averaged over its D elements and then over the real positions of the batch (padding counts nowhere), so it
    equals `projection_loss` of the real positions' rows.

    Args:
        student_projection: (B, S, D), a student layer at every position after its head.
        teacher_projection: (B, S, D), from the cache (`hidden_<layer>`, 0 past a window's length).
        real: (B, S) bool, the positions inside each window (p < length).
    """
    if student_projection.shape != teacher_projection.shape or student_projection.dim() != 3:
        raise KDCacheError(f"student projection {tuple(student_projection.shape)} and cached projection "
                           f"{tuple(teacher_projection.shape)} must both be (batch, positions, dim)")
    z_s = _as_float(student_projection)
    z_t = teacher_projection.detach().to(z_s.dtype)
    per_position = (z_s - z_t).pow(2).mean(dim=-1)
    weights = real.to(z_s.dtype)
    return (per_position * weights).sum() / weights.sum().clamp(min=1)
