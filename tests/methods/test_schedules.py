"""Schedules: Algorithm 1's temperature, Eq. 5's phi, the psi presets (Eqs. 6-8), per-step positions, Pro-KD."""

from __future__ import annotations

import pytest

from kdcache.errors import KDCacheError
from kdcache.methods.schedules import epoch_position, parse_psi, phi, prokd_checkpoint, psi, temperature


def algorithm_1(n: int, t_max: int) -> list[int]:
    """Algorithm 1's loop, line by line: the T in effect while epoch i trains, for i = 1..n."""
    T = t_max
    k = max(1, n // t_max)  # line 3, k = floor(n / T_max), kept >= 1 so `i mod k` is defined when n < T_max
    in_effect = []
    for i in range(1, n + 1):
        if i % k == 0:       # line 5: the check precedes the epoch's training
            T = max(1, T - 1)  # line 6, floored at 1 (Eq. 5: 1 <= T_i)
        in_effect.append(T)
    return in_effect


# --- temperature ------------------------------------------------------------------------------------------

def test_temperature_paper_cifar_run_boundaries():
    # n = 200, T_max = 20 -> k = 10: the decrement happens at the start of epochs 10, 20, ..., 190 (and 200, floored)
    expected = {1: 20, 9: 20, 10: 19, 19: 19, 20: 18, 29: 18, 30: 17, 99: 11, 100: 10, 109: 10, 110: 9,
                179: 3, 180: 2, 189: 2, 190: 1, 199: 1, 200: 1}
    assert {i: temperature(i, 200, 20) for i in expected} == expected


def test_temperature_paper_cifar_run_epochs_per_temperature():
    sequence = [temperature(i, 200, 20) for i in range(1, 201)]
    counts = {T: sequence.count(T) for T in range(1, 21)}
    assert counts == {20: 9, **{T: 10 for T in range(2, 20)}, 1: 11}
    assert sequence == sorted(sequence, reverse=True)


def test_temperature_n_not_divisible_by_t_max():
    # n = 30, T_max = 7 -> k = 4: decrements at epochs 4, 8, ..., 24 reach 1; the ones at 28 are floored
    assert [temperature(i, 30, 7) for i in range(1, 31)] == (
        [7] * 3 + [6] * 4 + [5] * 4 + [4] * 4 + [3] * 4 + [2] * 4 + [1] * 7)


def test_temperature_n_smaller_than_t_max_uses_k_1():
    # n = 5, T_max = 10 -> floor(5/10) = 0, taken as k = 1: T drops every epoch, starting at epoch 1
    assert [temperature(i, 5, 10) for i in range(1, 6)] == [9, 8, 7, 6, 5]


@pytest.mark.parametrize("t_max", [1, 2, 3, 7, 10, 20, 25])
def test_temperature_closed_form_matches_algorithm_1(t_max):
    for n in range(1, 61):
        assert [temperature(i, n, t_max) for i in range(1, n + 1)] == algorithm_1(n, t_max), (n, t_max)
    assert [temperature(i, 200, t_max) for i in range(1, 201)] == algorithm_1(200, t_max)


def test_temperature_of_a_real_position_counts_whole_epochs():
    assert temperature(9.999, 200, 20) == 20
    assert temperature(10.0, 200, 20) == 19
    assert temperature(epoch_position(9 * 50 - 1, 50), 200, 20) == 20  # last step of epoch 9
    assert temperature(epoch_position(9 * 50, 50), 200, 20) == 19      # first step of epoch 10
    # counting in steps instead anneals T within a single epoch: 100 steps, T_max = 10 -> k = 10 steps
    assert [temperature(step + 1, 100, 10) for step in (0, 8, 9, 50, 99)] == [10, 10, 9, 5, 1]


@pytest.mark.parametrize("args", [(0, 10, 5), (-1, 10, 5), (float("nan"), 10, 5), (1, 0, 5), (1, 10, 0), (1, 10, 2.5)])
def test_temperature_bad_arguments(args):
    with pytest.raises(KDCacheError):
        temperature(*args)


# --- phi --------------------------------------------------------------------------------------------------

def test_phi_values():
    assert phi(20, 20) == pytest.approx(1 / 20)   # the smoothest teacher, at epoch 1
    assert phi(1, 20) == 1.0                      # the teacher itself
    assert phi(10, 10) == pytest.approx(0.1)
    assert phi(5, 10) == pytest.approx(0.6)       # 1 - 4/10
    assert [phi(T, 4) for T in (4, 3, 2, 1)] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("T", [0, 21, 2.5])
def test_phi_outside_1_to_t_max(T):
    with pytest.raises(KDCacheError, match="temperature"):
        phi(T, 20)


# --- psi --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,i,expected", [
    ("cifar", 1, 1 / 150), ("cifar", 75, 0.5), ("cifar", 149, 149 / 150), ("cifar", 150, 1.0), ("cifar", 151, 1.0),
    ("cifar", 200, 1.0),
    ("glue", 1, 1 / 40), ("glue", 19, 19 / 40), ("glue", 20, 0.5), ("glue", 21, 1.0), ("glue", 30, 1.0),
    ("linear:11", 1, 0.0), ("linear:11", 2, 0.1), ("linear:11", 6, 0.5), ("linear:11", 11, 1.0), ("linear:11", 12, 1.0),
    ("linear:2", 1, 0.0), ("linear:2", 2, 1.0),
    ("step:10", 1, 0.0), ("step:10", 10, 0.0), ("step:10", 11, 1.0), ("step:10", 30, 1.0),
    ("step:0", 1, 1.0),
    ("constant:0.3", 1, 0.3), ("constant:0.3", 30, 0.3), ("constant:0", 5, 0.0), ("constant:1", 5, 1.0),
])
def test_psi_presets_at_boundary_epochs(spec, i, expected):
    assert psi(spec, i, 30 if spec != "cifar" else 200) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("spec,i,expected", [
    ("cifar", 1.5, 1.5 / 150),        # continuous within an epoch
    ("linear:11", 1.5, 0.05),
    ("glue", 20.5, 20.5 / 40),        # still epoch 20: the jump waits for epoch 21
    ("glue", 21.0, 1.0),
    ("step:10", 10.99, 0.0),          # still epoch 10
    ("step:10", 11.0, 1.0),
])
def test_psi_at_real_positions(spec, i, expected):
    assert psi(spec, i, 30) == pytest.approx(expected)


def test_linear_psi_starts_at_zero_as_the_paper_requires():
    for e in (2, 5, 150):
        assert psi(f"linear:{e}", 1, 200) == 0.0
        assert psi(f"linear:{e}", e, 200) == 1.0


def test_parse_psi_normalises():
    assert parse_psi(" LINEAR:30 ").spec == "linear:30"
    assert parse_psi("Cifar").form == "cifar"
    assert parse_psi("constant:0.50").param == 0.5
    assert parse_psi("step:20")(21) == 1.0


@pytest.mark.parametrize("spec", [
    "", "cosine", "cifar:1", "glue:0", "glue:x", "cifar:2.5", "linear", "linear:", "linear:1", "linear:0", "linear:2.5", "linear:-3",
    "step", "step:x", "step:1.5", "step:-1", "constant", "constant:abc", "constant:1.5", "constant:-0.1",
    "constant:nan", "step:1:2", "linear 30",
])
def test_malformed_psi_specs_name_the_spec_and_the_valid_forms(spec):
    with pytest.raises(KDCacheError) as caught:
        parse_psi(spec)
    message = str(caught.value)
    assert repr(spec) in message and "valid forms: cifar, glue, cifar:N or glue:N" in message and "\n" not in message
    with pytest.raises(KDCacheError):
        psi(spec, 1, 10)


def test_scaled_psi_is_the_papers_equation_at_its_own_length():
    """cifar:200 is Eq. 7 and glue:30 Eq. 8, at every epoch and within epochs: the scaled forms are the equations."""
    positions = [i / 4 for i in range(4, 4 * 200 + 1)]
    assert all(psi("cifar:200", i, 200) == pytest.approx(psi("cifar", i, 200), abs=1e-15) for i in positions)
    assert all(psi("glue:30", i, 30) == pytest.approx(psi("glue", i, 30), abs=1e-15) for i in positions if i <= 30)


@pytest.mark.parametrize("n", [3, 5, 8, 12, 13, 45, 100])
def test_scaled_psi_keeps_the_shape_at_any_length(n):
    """Eq. 7's shape: psi = i / (3n/4), reaching 1 at three quarters of the run; Eq. 8's: i / (4n/3) up to epoch
    2n/3 (psi just under 1/2 there), then 1: the hinge keeps the same share of the run as in the paper."""
    cifar = [psi(f"cifar:{n}", i, n) for i in range(1, n + 1)]
    assert all(b >= a for a, b in zip(cifar, cifar[1:])) and cifar[-1] == 1.0
    assert cifar[0] == pytest.approx(4 / (3 * n))
    assert all((v == 1.0) == (i >= 0.75 * n) for i, v in enumerate(cifar, 1))
    glue = [psi(f"glue:{n}", i, n) for i in range(1, n + 1)]
    last_ramp = (2 * n) // 3
    assert glue[last_ramp - 1] == pytest.approx(3 * last_ramp / (4 * n)) and glue[last_ramp - 1] <= 0.5
    assert all(v == 1.0 for v in glue[last_ramp:]) and all(v < 1.0 for v in glue[:last_ramp])
    assert parse_psi(f" GLUE:{n} ").spec == f"glue:{n}"


def test_psi_bad_position():
    with pytest.raises(KDCacheError, match="epoch"):
        psi("cifar", 0, 200)


# --- per-step positions -----------------------------------------------------------------------------------

def test_epoch_position():
    assert epoch_position(0, 100) == 1.0
    assert epoch_position(50, 100) == 1.5
    assert epoch_position(100, 100) == 2.0
    assert epoch_position(250, 100) == 3.5
    with pytest.raises(KDCacheError):
        epoch_position(-1, 100)
    with pytest.raises(KDCacheError):
        epoch_position(0, 0)


# --- Pro-KD -----------------------------------------------------------------------------------------------

def test_prokd_checkpoint_blocks_with_remainder_on_the_last():
    # n = 10, k = 3: blocks of floor(10/3) = 3 epochs; the last checkpoint also takes the remainder (epoch 10)
    assert [prokd_checkpoint(i, 10, 3) for i in range(1, 11)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_prokd_checkpoint_even_split():
    sequence = [prokd_checkpoint(i, 200, 4) for i in range(1, 201)]
    assert sequence == [0] * 50 + [1] * 50 + [2] * 50 + [3] * 50
    assert [prokd_checkpoint(i, 5, 5) for i in range(1, 6)] == [0, 1, 2, 3, 4]
    assert [prokd_checkpoint(i, 7, 1) for i in range(1, 8)] == [0] * 7


def test_prokd_checkpoint_needs_an_epoch_per_checkpoint():
    with pytest.raises(KDCacheError, match="checkpoint"):
        prokd_checkpoint(1, 3, 5)
    with pytest.raises(KDCacheError):
        prokd_checkpoint(0, 10, 3)
