"""Distillation losses on sparse teacher targets: top-k and sampled rows, each the sibling of a dense loss in
`kdcache.methods.losses` (same hyperparameters, same reductions, equal to it when the target keeps every output;
see docs/methods.md, "Sparse targets").

Shapes, for R rows and a task with C outputs (classification only: a single real output has nothing to keep
sparsely). A row is a sample, or one position of a sequence: token-level targets flatten (batch, positions) to
R = batch * positions and pass `mask` to drop the padded positions, as torchtune's KD losses take
`(batch_size * num_tokens, vocab_size)`.

- `student_logits`: (R, C) float, the student's outputs, carrying the graph;
- `topk_values`: (R, K) the teacher's K largest raw logits (float16 or float32; any order, stored descending);
- `topk_indices`: (R, K) int64, their output ids, distinct within a row, each in [0, C);
- `logsumexp`: (R, L) float32, log sum_c exp(z_T[c] / T_l) over ALL C teacher outputs, one column per recorded
  temperature T_l (column 0: T = 1), or (R,) when only T = 1 was recorded;
- `sampled_ids`, `sampled_counts`, `sampled_logprobs`: (R, W) the unique ids of N draws with replacement from
  softmax(z_T / T_s), how many times each was drawn (summing to N on every row; unused slots have count 0 and
  an arbitrary id and log-prob), and each id's teacher log-softmax at T = 1 (float32);
- `labels`: (R,) int64 class ids, -1 = no label;
- `mask`: (R,) bool, the rows that count, or None for all of them. The rows it drops must still hold finite
  targets (zeros will do): a NaN there would reach their gradient as 0 x NaN.

Teacher targets are detached; every loss returns a scalar in at least float32, connected to `student_logits`.
Teacher terms average over the rows `mask` keeps (0 when it keeps none); label terms over the kept, labelled ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdcache.errors import KDCacheError
from kdcache.methods.losses import (_as_float, _check_unit, ce, continuation_hinge, hinge_settings,
                                     masked_mean)

#: how `topk_kd_loss` treats the teacher's mass outside the kept ids
TAILS = ("bucket", "renormalised")


# --- checks and shared pieces -------------------------------------------------------------------------

def _check_temperature(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise KDCacheError(f"{name} must be a positive number, got {value}")
    return value


def _sparse_rows(student_logits: torch.Tensor, ids: torch.Tensor, *others: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
    """Check the shapes of a student batch against its sparse target; return the upcast student logits."""
    if student_logits.dim() != 2:
        raise KDCacheError(f"student logits must be (rows, outputs), got shape {tuple(student_logits.shape)}: "
                           "flatten (batch, positions) into rows")
    rows, outputs = student_logits.shape
    if ids.dim() != 2 or ids.shape[0] != rows:
        raise KDCacheError(f"sparse target ids {tuple(ids.shape)} do not match the student's {rows} rows: "
                           "expected (rows, K)")
    for other in others:
        if other.shape != ids.shape:
            raise KDCacheError(f"sparse target arrays differ in shape: {tuple(other.shape)} against the ids' "
                               f"{tuple(ids.shape)}")
    if ids.shape[1] > outputs:
        raise KDCacheError(f"the target keeps {ids.shape[1]} ids per row but the student has {outputs} outputs: "
                           "is the cache from a teacher of another task?")
    if mask is not None and (mask.shape != (rows,) or mask.dtype != torch.bool):
        raise KDCacheError(f"mask must be a ({rows},) bool tensor of the rows that count, got "
                           f"{tuple(mask.shape)} {mask.dtype}")
    return _as_float(student_logits)


def _labels_in(labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Labels of the rows `mask` drops become -1 (missing), so the label term skips them too."""
    return labels if mask is None else torch.where(mask, labels, torch.full_like(labels, -1))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler, 2012): -inf at x = 0."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def recorded_temperature(temperatures: Sequence[float], temperature: float) -> int:
    """The column of `logsumexp` that holds T: the tail is exact only at a recorded temperature, so any other
    is refused rather than approximated.

    Args:
        temperatures: the recorded temperatures, in the order of the `logsumexp` columns (T = 1 first).
        temperature: T > 0, the temperature the loss is asked for.
    """
    for column, recorded in enumerate(temperatures):
        if math.isclose(float(recorded), temperature, rel_tol=1e-6):
            return column
    listed = ", ".join(f"{float(t):g}" for t in temperatures)
    raise KDCacheError(f"temperature {temperature:g} was not recorded in the cache's logsumexp (recorded: {listed}): "
                       "capture with --lse-temperatures including it, or use one of these")


def topk_teacher_log_probs(topk_values: torch.Tensor, logsumexp_at_t: torch.Tensor,
                           temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's exact log-probabilities at T of its kept ids and of the rest taken as one bucket: what a
    top-k row with its log-sum-exp reconstructs, without the cancellation of 1 - sum p in linear space.

    Returns (log p_kept (R, K), log p_tail (R,)); log p_tail is -inf when the kept ids hold all the mass (and
    where rounding of float16 values makes them appear to hold more).

    Args:
        topk_values: (R, K) raw teacher logits.
        logsumexp_at_t: (R,) log sum_c exp(z_T[c] / T) over all C outputs.
        temperature: T > 0, the temperature of that log-sum-exp.
    """
    log_kept = topk_values / temperature - logsumexp_at_t.unsqueeze(-1)
    kept_mass = torch.logsumexp(log_kept, dim=-1).clamp(max=0.0)
    return log_kept, _log1mexp(kept_mass)


def topk_squared_distance(z_s: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor,
                          phi: float) -> torch.Tensor:
    """(R,) Continuation-KD's d on the kept support: exact on the kept ids, and on the others the part of
    (z_S - phi z_T)^2 that the kept values prove (every unkept teacher logit is <= the smallest kept one v_K).

        d = sum_k (z_S[i_k] - phi v_k)^2 + sum_{j not kept} relu(z_S[j] - phi v_K)^2

    Never more than the dense d; equal to it when K = C (the second sum is then empty).

    Args:
        z_s: (R, C) student logits.
        topk_values: (R, K) raw teacher logits, same dtype as `z_s`.
        topk_indices: (R, K) int64 ids.
        phi: phi(T_i) in [0, 1].
    """
    student_kept = z_s.gather(-1, topk_indices)
    kept = (student_kept - phi * topk_values).pow(2).sum(dim=-1)
    if topk_indices.shape[-1] == z_s.shape[-1]:
        return kept
    floor = phi * topk_values.amin(dim=-1, keepdim=True)
    # The relu term over all C outputs less the kept ids' share, rather than a (R, C) mask of the unkept ones:
    # 15-25% faster on CPU (B = 256, C = 1000), gradients exact, the value exact to rounding of the kept share.
    above_all = torch.relu(z_s - floor).pow(2).sum(dim=-1)
    above_kept = torch.relu(student_kept - floor).pow(2).sum(dim=-1)
    return kept + (above_all - above_kept)


# --- losses -----------------------------------------------------------------------------------------

def topk_kd_loss(student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor,
                 logsumexp: torch.Tensor | None, labels: torch.Tensor, *, temperature: float,
                 temperatures: Sequence[float] = (), alpha: float, tail: str = "bucket",
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Vanilla KD (`vanilla_kd_loss`) against a top-k target, exact at every recorded T: the C outputs are
    grouped into the K kept ids and one tail bucket, for the teacher and the student alike.

    L = alpha CE(z_S, y) + (1 - alpha) T^2 (1/R) sum_r KL(p_r || q_r), over K + 1 outcomes:
        p_k    = exp(v_k / T - lse_T)            (exact: lse_T is over all C outputs, stored)
        p_tail = 1 - sum_k p_k                   (computed as log1mexp(logsumexp_k log p_k))
        q_k    = softmax(z_S / T)[i_k],  q_tail = sum_{j not kept} softmax(z_S / T)[j]
    This is the KL of the two distributions with the unkept outputs merged, never more than the full KL
    (merging outcomes can only lose information), and equal to it when K = C.

    tail="renormalised" is the approximation DistillKit and axolotl train with, kept for comparison: teacher and
    student both renormalised over the kept ids, the tail ignored (needs no log-sum-exp, so any T works); it
    drops the tail mass from the target and is biased wherever that mass is not small.

    Args:
        student_logits: (R, C).
        topk_values: (R, K) raw teacher logits.
        topk_indices: (R, K) int64 ids.
        logsumexp: (R, L) float32, one column per recorded temperature (T = 1 first), or (R,) for T = 1 alone;
            unused (may be None) with tail="renormalised".
        labels: (R,) int64, -1 = missing.
        temperature: T > 0; with tail="bucket" it must be one of `temperatures`.
        temperatures: the recorded temperatures, in `logsumexp`'s column order (unused when renormalised).
        alpha: weight of the hard-label term, in [0, 1].
        tail: "bucket" (exact) or "renormalised".
        mask: (R,) bool rows that count, or None.
    """
    if tail not in TAILS:
        raise KDCacheError(f"unknown tail {tail!r}: expected one of {', '.join(TAILS)}")
    alpha = _check_unit("alpha", alpha)
    temperature = _check_temperature("temperature", temperature)
    z_s = _sparse_rows(student_logits, topk_indices, topk_values, mask=mask)
    if tail == "bucket":
        if logsumexp is None or not temperatures:
            raise KDCacheError("the exact tail needs the cache's logsumexp and its recorded temperatures: "
                               "capture with --topk (which stores them), or use the renormalised tail")
        lse = logsumexp.unsqueeze(-1) if logsumexp.dim() == 1 else logsumexp
        if lse.shape != (z_s.shape[0], len(temperatures)):
            raise KDCacheError(f"logsumexp {tuple(logsumexp.shape)} does not hold {z_s.shape[0]} rows of "
                               f"{len(temperatures)} recorded temperatures")
        lse_t = lse[:, recorded_temperature(temperatures, temperature)].detach().to(z_s.dtype)
    labels = _labels_in(labels, mask)
    if alpha == 1.0:
        return ce(student_logits, labels)
    ids = topk_indices.long()
    values = topk_values.detach().to(z_s.dtype)
    s = z_s / temperature
    if tail == "renormalised":
        log_p = F.log_softmax(values / temperature, dim=-1)
        log_q = F.log_softmax(s.gather(-1, ids), dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    else:
        log_p, log_p_tail = topk_teacher_log_probs(values, lse_t, temperature)
        log_q_all = F.log_softmax(s, dim=-1)
        log_q = log_q_all.gather(-1, ids)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
        if ids.shape[-1] < z_s.shape[-1]:
            # A log-sum-exp over the unkept outputs, not log(1 - sum q_k): exact however small the student's tail.
            # At least one output is unkept, so it is finite and so is its gradient.
            log_q_tail = torch.logsumexp(log_q_all.scatter(-1, ids, -math.inf), dim=-1)
            has_tail = torch.isfinite(log_p_tail)
            log_p_tail = torch.where(has_tail, log_p_tail, torch.zeros_like(log_p_tail))
            kl = kl + torch.where(has_tail, log_p_tail.exp() * (log_p_tail - log_q_tail), torch.zeros_like(kl))
    soft = temperature ** 2 * masked_mean(kl, mask)
    if alpha == 0.0:
        return soft
    return alpha * ce(student_logits, labels) + (1.0 - alpha) * soft


def sampled_kd_loss(student_logits: torch.Tensor, sampled_ids: torch.Tensor, sampled_counts: torch.Tensor,
                    sampled_logprobs: torch.Tensor, labels: torch.Tensor, *, alpha: float,
                    sample_temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Random-sampling KD (RS-KD; Anshumann et al., ACL 2025): forward KL at T = 1 estimated from the teacher's
    sampled ids, which, unlike top-k, leaves the expected gradient unbiased.

    L = alpha CE(z_S, y) + (1 - alpha) (1/R) sum_r sum_i w_i (log p_i - log q_i),   q = softmax(z_S) (T = 1)
        T_s = 1:  w_i = c_i / N. Each draw is from p itself, so for every row the estimate's expectation over
                  the draws IS KL(p || q), and its gradient's expectation is the gradient of KL(p || q): unbiased.
        T_s != 1: w_i = c_i p_i^(1 - 1/T_s) / sum_j c_j p_j^(1 - 1/T_s), self-normalised importance weights
                  (p / p_{T_s} up to a constant that the normalisation cancels, so only the stored T = 1 log-probs
                  are needed). Only consistent: it converges to KL(p || q) as N grows, with a bias of order 1/N
                  for a finite N (a ratio of two unbiased sums is not an unbiased ratio).
    No T^2 factor: the loss is at T = 1, as RS-KD trains.

    Args:
        student_logits: (R, C).
        sampled_ids: (R, W) int64 ids.
        sampled_counts: (R, W) integer draw counts, summing to N on every row; 0 marks an unused slot.
        sampled_logprobs: (R, W) the teacher's log-softmax at T = 1 of each id.
        labels: (R,) int64, -1 = missing.
        alpha: weight of the hard-label term, in [0, 1].
        sample_temperature: T_s > 0, the temperature the ids were drawn at (recorded with the cache).
        mask: (R,) bool rows that count, or None.
    """
    alpha = _check_unit("alpha", alpha)
    sample_temperature = _check_temperature("sample temperature", sample_temperature)
    z_s = _sparse_rows(student_logits, sampled_ids, sampled_counts, sampled_logprobs, mask=mask)
    labels = _labels_in(labels, mask)
    if alpha == 1.0:
        return ce(student_logits, labels)
    used = sampled_counts > 0
    zero = torch.zeros((), dtype=z_s.dtype, device=z_s.device)
    ids = torch.where(used, sampled_ids.long(), torch.zeros_like(sampled_ids, dtype=torch.long))
    log_p = torch.where(used, sampled_logprobs.detach().to(z_s.dtype), zero)
    weight = torch.where(used, sampled_counts.to(z_s.dtype), zero)
    exponent = 1.0 - 1.0 / sample_temperature
    if exponent != 0.0:
        tilt = torch.where(used, exponent * log_p, torch.full_like(log_p, -math.inf))
        top = tilt.amax(dim=-1, keepdim=True)
        weight = weight * torch.exp(tilt - torch.where(torch.isfinite(top), top, zero))
    weight = weight / weight.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(z_s.dtype).tiny)
    log_q = F.log_softmax(z_s, dim=-1).gather(-1, ids)
    soft = masked_mean((weight * (log_p - log_q)).sum(dim=-1), mask)
    if alpha == 0.0:
        return soft
    return alpha * ce(student_logits, labels) + (1.0 - alpha) * soft


def topk_continuation_kd_loss(student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor,
                              labels: torch.Tensor, *, phi: float, psi: float, margin: float,
                              reduction: str = "sample", phi_margin: float | None = None,
                              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Continuation-KD (`continuation_kd_loss`) against a top-k target: the same hinge and reductions on the
    distance of `topk_squared_distance`, which is the dense distance when K = C.

    L = psi CE(z_S, y) + (1 - psi) L_CNT(d),
    d_r = sum_k (z_S[r, i_k] - phi v_k)^2 + sum_{j not kept} relu(z_S[r, j] - phi v_K)^2
    with v_K the row's smallest kept value; `element` and `mse` divide by C, the student's outputs.

    Args:
        student_logits: (R, C).
        topk_values: (R, K) raw teacher logits.
        topk_indices: (R, K) int64 ids.
        labels: (R,) int64, -1 = missing.
        phi, psi, margin, reduction, phi_margin: as `continuation_kd_loss`.
        mask: (R,) bool rows that count, or None. `batch` and `mse` take one hinge on the kept rows' mean.
    """
    phi, psi, phi_m, margin = hinge_settings(reduction, phi, psi, phi_margin, margin)
    z_s = _sparse_rows(student_logits, topk_indices, topk_values, mask=mask)
    labels = _labels_in(labels, mask)
    if psi == 1.0:
        return ce(student_logits, labels)
    distance = topk_squared_distance(z_s, topk_values.detach().to(z_s.dtype), topk_indices.long(), phi)
    hinge = continuation_hinge(distance, outputs=z_s.shape[-1], allowed=margin * phi_m, reduction=reduction,
                               mask=mask)
    if psi == 0.0:
        return hinge
    return psi * ce(student_logits, labels) + (1.0 - psi) * hinge


def topk_annealing_kd_loss(student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor, *,
                           phi: float, mean_outputs: bool = False,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Annealing-KD stage 1 (`annealing_kd_loss`) against a top-k target: Continuation-KD's sparse distance
    with no hinge and no label term, L = (1/R) sum_r d_r (divided by C with `mean_outputs`).

    Args:
        student_logits: (R, C).
        topk_values: (R, K) raw teacher logits.
        topk_indices: (R, K) int64 ids.
        phi: phi(T_i) in [0, 1].
        mean_outputs: average over the C outputs instead of summing them.
        mask: (R,) bool rows that count, or None.
    """
    phi = _check_unit("phi", phi)
    z_s = _sparse_rows(student_logits, topk_indices, topk_values, mask=mask)
    distance = topk_squared_distance(z_s, topk_values.detach().to(z_s.dtype), topk_indices.long(), phi)
    loss = masked_mean(distance, mask)
    return loss / z_s.shape[-1] if mean_outputs else loss
