"""Schedules of the annealed KD methods: temperature T_i, teacher scale phi(T_i), loss mix psi(i), Pro-KD checkpoint.

Epochs are counted from 1, as in the Continuation-KD paper (Algorithm 1: `for i = 1 to n`). Every function
is pure; `docs/methods.md` gives the formulas and the choices the papers leave open.

Per-step schedules (`--schedule-unit step`, for runs of one or a few epochs): the caller passes the real
position `i = epoch_position(step, steps_per_epoch) = 1 + step / steps_per_epoch` instead of the epoch
number, so epoch e spans i in [e, e + 1). `psi` is evaluated at the real i, so the smooth presets rise
within an epoch while the step-shaped ones (`step:K`, the jump of `glue`) still switch at an epoch boundary.
`temperature` counts its decrements on floor(i); to anneal T within one epoch, count it in steps instead
(see `temperature`).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

from kdcache.errors import KDCacheError

PSI_FORMS = ("cifar", "glue", "cifar:N or glue:N (Eq. 7 or 8 scaled to an N-epoch run, N >= 2)", "linear:E (E >= 2)",
             "step:K", "constant:V (0 <= V <= 1)")
#: The run length each paper equation was written for: Eq. 7 for CIFAR's 200 epochs, Eq. 8 for GLUE's 30.
PAPER_EPOCHS = {"cifar": 200, "glue": 30}


def _check_position(i: float) -> float:
    if isinstance(i, bool) or not isinstance(i, numbers.Real) or not (math.isfinite(i) and i >= 1):
        raise KDCacheError(f"epoch position must be a number >= 1 (epochs count from 1), got {i!r}")
    return i


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise KDCacheError(f"{name} must be a positive integer, got {value!r}")
    return value


def epoch_position(step: int, steps_per_epoch: int) -> float:
    """The real-valued epoch position of optimiser step `step` (0-based, counted over the whole run).

    i = 1 + step / steps_per_epoch: step 0 is the start of epoch 1, step steps_per_epoch the start of epoch 2.
    Pass it as `i` to `temperature` and `psi` to update the schedules at every step rather than every epoch.
    """
    _check_count("steps_per_epoch", steps_per_epoch)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise KDCacheError(f"step must be a non-negative integer, got {step!r}")
    return 1 + step / steps_per_epoch


def temperature(i: float, n: int, t_max: int) -> int:
    """The temperature T in effect during epoch i of n, from Algorithm 1 of the Continuation-KD paper.

    The algorithm sets T = T_max and k = floor(n / T_max), then for i = 1..n first decrements T when
    i mod k == 0 and then trains epoch i. After epoch i's check, T has been decremented once for every
    multiple of k in 1..i, i.e. floor(i / k) times, so (never below 1, as Eq. 5 requires 1 <= T_i):

        T_i = max(1, T_max - floor(i / k)),   k = max(1, floor(n / T_max))

    k is taken as at least 1 when n < T_max (the algorithm's k = 0 would divide by zero): T then drops by 1
    every epoch, starting with epoch 1, and does not reach 1 within the run unless n >= T_max - 1.
    Example, n = 200, T_max = 20 (k = 10): epochs 1-9 -> 20, 10-19 -> 19, ..., 180-189 -> 2, 190-200 -> 1.

    A real i (per-step schedules) counts decrements on floor(i), so T changes only at epoch boundaries. To
    anneal T within a single epoch, call it in steps instead: `temperature(step + 1, total_steps, t_max)`.

    Args:
        i: the epoch, >= 1 (or a real epoch position from `epoch_position`).
        n: the number of epochs of the run, >= 1.
        t_max: the starting (maximum) temperature T_max, >= 1.
    """
    _check_position(i)
    _check_count("n (epochs)", n)
    _check_count("t_max", t_max)
    k = max(1, n // t_max)
    return max(1, t_max - math.floor(i) // k)


def phi(T: int, t_max: int) -> float:
    """The teacher (and margin) scale of Eq. 5: phi(T) = 1 - (T - 1) / T_max, for 1 <= T <= T_max.

    phi(T_max) = 1 / T_max (the smoothest teacher, at the start), phi(1) = 1 (the teacher as it is).
    """
    _check_count("t_max", t_max)
    if isinstance(T, bool) or not isinstance(T, numbers.Integral) or not 1 <= T <= t_max:
        raise KDCacheError(f"temperature T must be an integer in [1, t_max={t_max}], got {T!r}")
    return 1.0 - (T - 1) / t_max


@dataclass(frozen=True)
class PsiSchedule:
    """A validated psi spec: `form` is cifar, glue, linear, step or constant; `param` is N, E, K or V (or None: the
    paper's equation at its own run length)."""

    spec: str
    form: str
    param: float | None = None

    def __call__(self, i: float) -> float:
        """psi at epoch position i (>= 1); see `psi` for the formulas."""
        _check_position(i)
        if self.form in PAPER_EPOCHS:  # Eq. 7 or 8 over N epochs, the same shape at any N (200, 30: as printed)
            n = PAPER_EPOCHS[self.form] if self.param is None else self.param
            if self.form == "cifar":  # i / 150 of 200: reaches 1 at three quarters of the run
                return min(1.0, 4 * i / (3 * n))
            return 3 * i / (4 * n) if 3 * math.floor(i) <= 2 * n else 1.0  # i / 40 to epoch 20 of 30, then 1
        if self.form == "linear":
            return min(1.0, (i - 1) / (self.param - 1))
        if self.form == "step":
            return 0.0 if math.floor(i) <= self.param else 1.0
        return float(self.param)


_SPEC = re.compile(r"^\s*([a-z]+)\s*(?::\s*(\S+?))?\s*$", re.IGNORECASE)


def parse_psi(spec: str) -> PsiSchedule:
    """Validate a psi spec without evaluating it (for the CLI to reject a bad flag before any work)."""
    def bad(why: str) -> KDCacheError:
        return KDCacheError(f"bad psi spec {spec!r}: {why}; valid forms: {', '.join(PSI_FORMS)}")

    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise bad("not of the form NAME or NAME:VALUE")
    form, value = match.group(1).lower(), match.group(2)
    if form in PAPER_EPOCHS:
        if value is None:
            return PsiSchedule(form, form)
        if not re.fullmatch(r"\d+", value) or int(value) < 2:
            raise bad(f"{form}:N needs a whole number of epochs N >= 2, got {value!r}")
        return PsiSchedule(f"{form}:{int(value)}", form, int(value))
    if form not in ("linear", "step", "constant"):
        raise bad(f"unknown form {form!r}")
    if value is None:
        raise bad(f"{form} needs a value ({form}:...)")
    if form == "constant":
        try:
            v = float(value)
        except ValueError:
            raise bad(f"{value!r} is not a number") from None
        if not 0.0 <= v <= 1.0:
            raise bad("V must be in [0, 1]")
        return PsiSchedule(f"constant:{v:g}", "constant", v)
    if not re.fullmatch(r"\d+", value):
        raise bad(f"{value!r} is not a whole number of epochs")
    count = int(value)
    if form == "linear" and count < 2:
        raise bad("linear:E needs E >= 2 (psi is 0 at epoch 1 and 1 at epoch E)")
    return PsiSchedule(f"{form}:{count}", form, count)


def psi(spec: str, i: float, n: int) -> float:
    """The weight psi(i) of the hard-label term at epoch i of n (Eq. 3), from a spec string.

    - `cifar`:      psi(i) = min(1, i / 150)                              (Eq. 7; psi(1) = 1/150)
    - `glue`:       psi(i) = i / 40 for i <= 20, 1 after                  (Eq. 8; jumps from 0.5 to 1 after epoch 20)
    - `cifar:N`:    psi(i) = min(1, i / (3N/4))                    (Eq. 7's shape over N epochs; cifar:200 = cifar)
    - `glue:N`:     psi(i) = i / (4N/3) for i <= 2N/3, 1 after     (Eq. 8's shape over N epochs; glue:30 = glue)
    - `linear:E`:   psi(i) = min(1, (i - 1) / (E - 1)), E >= 2            (psi(1) = 0, psi(E) = 1)
    - `step:K`:     psi(i) = 0 for i <= K, 1 after                        (Eq. 6: Annealing-KD's two stages)
    - `constant:V`: psi(i) = V

    For a real i (per-step schedules) the formulas are evaluated at i, except that the conditions "i <= 20"
    (glue) and "i <= K" (step) test the epoch floor(i), so a switch still happens at an epoch boundary.
    `n` is validated but no preset depends on it: linear:E and step:K name their epochs explicitly.

    Raises KDCacheError for a malformed or unknown spec, naming it and the valid forms.
    """
    _check_count("n (epochs)", n)
    return parse_psi(spec)(i)


def prokd_checkpoint(i: int, n: int, k: int) -> int:
    """The teacher checkpoint (0-based, in training order) Pro-KD distils from in epoch i of n, with k checkpoints.

    The run is cut into k blocks of floor(n / k) epochs: checkpoint j serves epochs
    j * floor(n/k) + 1 .. (j + 1) * floor(n/k), and the last checkpoint (the trained teacher) also serves the
    n mod k remaining epochs at the end:  j = min(k - 1, (i - 1) // floor(n / k)).
    Needs n >= k (every checkpoint gets at least one epoch); for one-epoch runs pass steps as i and n.
    """
    _check_count("i (epoch)", i)
    _check_count("n (epochs)", n)
    _check_count("k (checkpoints)", k)
    if n < k:
        raise KDCacheError(f"Pro-KD needs at least one epoch per teacher checkpoint: {n} epochs < {k} checkpoints")
    return min(k - 1, (i - 1) // (n // k))
