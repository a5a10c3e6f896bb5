"""The distillation losses, pinned to values computed by hand, and Annealing-KD as a special case of Continuation-KD."""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.errors import KDCacheError
from kdcache.methods.losses import annealing_kd_loss, ce, continuation_kd_loss, vanilla_kd_loss
from kdcache.methods.schedules import phi, psi, temperature

# The worked example used throughout (B = 2 samples, C = 3 outputs), with phi = 0.5:
#   z_S          = [[1, 2, 0], [0, 1, 3]]
#   z_T          = [[2, 0, 2], [4, 2, 0]]
#   phi z_T      = [[1, 0, 1], [2, 1, 0]]
#   z_S - phi z_T = [[0, 2, -1], [-2, 0, 3]]
#   d = ||.||^2  = [0 + 4 + 1, 4 + 0 + 9] = [5, 13]
# labels [1, 2]: CE_0 = log(1 + e + e^2) - 2 = 0.407606, CE_1 = log(1 + e + e^3) - 3 = 0.169846, mean 0.288726
STUDENT = [[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]
TEACHER = [[2.0, 0.0, 2.0], [4.0, 2.0, 0.0]]
LABELS = [1, 2]
CE_0 = math.log(1 + math.e + math.e ** 2) - 2
CE_1 = math.log(1 + math.e + math.e ** 3) - 3


def example(requires_grad: bool = False):
    student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=requires_grad)
    return student, torch.tensor(TEACHER, dtype=torch.float64), torch.tensor(LABELS)


def test_worked_example_constants():
    assert CE_0 == pytest.approx(0.407606, abs=1e-6)
    assert CE_1 == pytest.approx(0.169846, abs=1e-6)


# --- ce ---------------------------------------------------------------------------------------------------

def test_ce_matches_hand_computation():
    student, _, labels = example()
    assert ce(student, labels).item() == pytest.approx((CE_0 + CE_1) / 2, abs=1e-12)
    assert ce(student, labels).item() == pytest.approx(0.288726, abs=1e-6)


def test_ce_ignores_missing_labels():
    student, _, _ = example()
    assert ce(student, torch.tensor([1, -1])).item() == pytest.approx(CE_0, abs=1e-12)
    assert ce(student, torch.tensor([-1, 2])).item() == pytest.approx(CE_1, abs=1e-12)


def test_ce_with_no_labels_is_zero_and_still_differentiable():
    student, _, _ = example(requires_grad=True)
    loss = ce(student, torch.tensor([-1, -1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_ce_regression_is_mse_over_present_targets():
    student = torch.tensor([[1.0], [2.0], [3.0]])
    labels = torch.tensor([1.5, float("nan"), 2.0])
    # ((1 - 1.5)^2 + (3 - 2)^2) / 2 = (0.25 + 1) / 2
    assert ce(student, labels, kind="regression").item() == pytest.approx(0.625)
    assert ce(student.squeeze(-1), labels, kind="regression").item() == pytest.approx(0.625)
    assert ce(student, torch.full((3,), float("nan")), kind="regression").item() == 0.0


def test_unknown_kind_is_refused():
    student, _, labels = example()
    with pytest.raises(KDCacheError, match="kind"):
        ce(student, labels, kind="ranking")


# --- vanilla KD -------------------------------------------------------------------------------------------

def test_vanilla_kd_two_class_values_by_hand():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    labels = torch.tensor([-1])
    # T = 1: p = [3/4, 1/4], q = [1/2, 1/2]; KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812
    assert vanilla_kd_loss(student, teacher, labels, temperature=1, alpha=0.0).item() == pytest.approx(0.130812, abs=1e-6)
    # T = 2: p = [s, 1] / (1 + s) with s = sqrt(3); T^2 KL = 4 (p0 ln 2p0 + p1 ln 2p1) = 0.145363
    assert vanilla_kd_loss(student, teacher, labels, temperature=2, alpha=0.0).item() == pytest.approx(0.145363, abs=1e-6)


@pytest.mark.parametrize("temperature_", [1.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_vanilla_kd_against_the_kl_formula_written_out(temperature_, alpha):
    student, teacher, labels = example()
    p = torch.exp(teacher / temperature_) / torch.exp(teacher / temperature_).sum(-1, keepdim=True)
    q = torch.exp(student / temperature_) / torch.exp(student / temperature_).sum(-1, keepdim=True)
    kl_batchmean = (p * (torch.log(p) - torch.log(q))).sum() / student.shape[0]
    expected = alpha * (CE_0 + CE_1) / 2 + (1 - alpha) * temperature_ ** 2 * kl_batchmean.item()
    got = vanilla_kd_loss(student, teacher, labels, temperature=temperature_, alpha=alpha)
    assert got.item() == pytest.approx(expected, abs=1e-10)


def test_vanilla_kd_soft_term_uses_unlabelled_rows():
    student, teacher, _ = example()
    all_labelled = vanilla_kd_loss(student, teacher, torch.tensor([1, 2]), temperature=2, alpha=0.0)
    none_labelled = vanilla_kd_loss(student, teacher, torch.tensor([-1, -1]), temperature=2, alpha=0.0)
    assert none_labelled.item() == pytest.approx(all_labelled.item()) and none_labelled.item() > 0


def test_vanilla_kd_regression_replaces_kl_by_mse_to_teacher():
    student = torch.tensor([[1.0], [2.0], [3.0]])
    teacher = torch.tensor([[0.0], [2.0], [5.0]])
    labels = torch.tensor([1.5, float("nan"), 2.0])
    # 0.5 * MSE(labels) + 0.5 * MSE(teacher) = 0.5 * 0.625 + 0.5 * (1 + 0 + 4) / 3
    expected = 0.5 * 0.625 + 0.5 * 5 / 3
    for t in (1.0, 10.0):  # the temperature has no role for a single real output
        got = vanilla_kd_loss(student, teacher, labels, temperature=t, alpha=0.5, kind="regression")
        assert got.item() == pytest.approx(expected)


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.0, "alpha": 0.5}, "temperature"),
    ({"temperature": 4.0, "alpha": 1.5}, "alpha"),
])
def test_vanilla_kd_bad_hyperparameters(kwargs, match):
    student, teacher, labels = example()
    with pytest.raises(KDCacheError, match=match):
        vanilla_kd_loss(student, teacher, labels, **kwargs)


# --- Continuation-KD --------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction,margin,expected", [
    ("sample", 0.0, 9.0),     # mean(5, 13)
    ("sample", 8.0, 5.0),     # m phi = 4: mean(max(0, 5 - 4), max(0, 13 - 4)) = mean(1, 9)
    ("sample", 12.0, 3.5),    # m phi = 6: mean(max(0, -1), 7)
    ("batch", 12.0, 3.0),     # max(0, mean(5, 13) - 6) = 9 - 6
    ("batch", 20.0, 0.0),     # max(0, 9 - 10)
    ("element", 0.0, 3.0),    # mean(5/3, 13/3)
    ("element", 2.0, 2.0),    # m phi = 1: mean(5/3 - 1, 13/3 - 1) = mean(2/3, 10/3)
    ("element", 8.0, 1 / 6),  # m phi = 4: mean(max(0, 5/3 - 4), 13/3 - 4) = mean(0, 1/3)
    ("mse", 0.0, 3.0),        # the authors' F.mse_loss: (5 + 13) / (2 * 3)
    ("mse", 2.0, 2.0),        # max(0, 3 - 1)
    ("mse", 8.0, 0.0),        # max(0, 3 - 4): one hinge on the batch, unlike element's 1/6
])
def test_continuation_kd_hinge_by_hand(reduction, margin, expected):
    student, teacher, labels = example()
    got = continuation_kd_loss(student, teacher, labels, phi=0.5, psi=0.0, margin=margin, reduction=reduction)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_continuation_kd_mse_is_the_authors_mse_loss_hinge():
    """`mse` is what the authors' code computes: max(0, F.mse_loss(z_S, phi z_T) - m phi)."""
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    for margin in (0.0, 0.3, 5.0):
        want = torch.clamp(torch.nn.functional.mse_loss(student, 0.4 * teacher) - margin * 0.4, min=0)
        got = continuation_kd_loss(student, teacher, labels, phi=0.4, psi=0.0, margin=margin, reduction="mse")
        assert got.item() == pytest.approx(want.item(), abs=1e-6)


@pytest.mark.parametrize("phi_margin,expected", [
    (None, 5.0),  # Eq. 4: phi = 0.5 on the teacher and the margin: m phi = 4, mean(5 - 4, 13 - 4)
    (1.0, 2.5),   # margin fixed (coefficient 1): m = 8, mean(max(0, 5 - 8), 13 - 8) = mean(0, 5)
    (0.25, 7.0),  # m phi_margin = 2: mean(3, 11)
])
def test_continuation_kd_margin_coefficient_apart_from_the_teacher(phi_margin, expected):
    """Table 7's ablation anneals the teacher and the margin apart: phi scales z_T, phi_margin scales m."""
    student, teacher, labels = example()
    got = continuation_kd_loss(student, teacher, labels, phi=0.5, psi=0.0, margin=8.0, phi_margin=phi_margin)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_continuation_kd_mixes_ce_and_hinge_with_psi():
    student, teacher, labels = example()
    got = continuation_kd_loss(student, teacher, labels, phi=0.5, psi=0.25, margin=8.0)
    # 0.25 * CE + 0.75 * 5
    assert got.item() == pytest.approx(0.25 * (CE_0 + CE_1) / 2 + 0.75 * 5.0, abs=1e-12)
    assert got.item() == pytest.approx(3.822181, abs=1e-6)


def test_continuation_kd_psi_zero_never_evaluates_ce():
    student, teacher, _ = example(requires_grad=True)
    out_of_range = torch.tensor([7, 9])  # CE would raise on these class ids
    loss = continuation_kd_loss(student, teacher, out_of_range, phi=0.5, psi=0.0, margin=0.0)
    assert loss.item() == pytest.approx(9.0)
    loss.backward()
    # d/dz_S mean_b ||z_S - phi z_T||^2 = 2 (z_S - phi z_T) / B = (z_S - phi z_T)
    assert torch.allclose(student.grad, torch.tensor([[0.0, 2.0, -1.0], [-2.0, 0.0, 3.0]], dtype=torch.float64))


def test_continuation_kd_psi_zero_with_everything_inside_the_margin_still_has_a_graph():
    student, teacher, labels = example(requires_grad=True)
    loss = continuation_kd_loss(student, teacher, labels, phi=0.5, psi=0.0, margin=100.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_continuation_kd_psi_one_is_plain_ce():
    student, teacher, labels = example()
    noisy_teacher = torch.full_like(teacher, float("nan"))  # the teacher term is not computed at all
    got = continuation_kd_loss(student, noisy_teacher, labels, phi=0.5, psi=1.0, margin=1.0)
    assert got.item() == pytest.approx((CE_0 + CE_1) / 2, abs=1e-12)


def test_continuation_kd_regression():
    student = torch.tensor([[1.0], [2.0], [3.0]])
    teacher = torch.tensor([[0.0], [2.0], [5.0]])
    labels = torch.tensor([1.5, float("nan"), 2.0])
    # hinge (m = 0, phi = 0.5): mean((1 - 0)^2, (2 - 1)^2, (3 - 2.5)^2) = 2.25 / 3 = 0.75; label MSE = 0.625
    got = continuation_kd_loss(student, teacher, labels, phi=0.5, psi=0.5, margin=0.0, kind="regression")
    assert got.item() == pytest.approx(0.5 * 0.625 + 0.5 * 0.75)


def test_gradients_reach_the_student_but_not_the_teacher():
    torch.manual_seed(0)
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    labels = torch.tensor([0, 1, -1, 4])
    losses = [
        ce(student, labels),
        vanilla_kd_loss(student, teacher, labels, temperature=4, alpha=0.5),
        continuation_kd_loss(student, teacher, labels, phi=0.3, psi=0.4, margin=1.0),
        annealing_kd_loss(student, teacher, phi=0.3),
    ]
    for loss in losses:
        student.grad = None
        loss.backward()
        assert student.grad is not None and student.grad.abs().sum() > 0
        assert teacher.grad is None


def test_float16_logits_do_not_overflow():
    student = torch.full((2, 10), 300.0, dtype=torch.float16)
    teacher = torch.full((2, 10), -300.0, dtype=torch.float16)
    # d = 10 * (300 + 300)^2 = 3.6e6, far beyond float16's 65504
    got = continuation_kd_loss(student, teacher, torch.tensor([0, 1]), phi=1.0, psi=0.0, margin=0.0)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(3.6e6)


@pytest.mark.parametrize("kwargs,match", [
    ({"phi": 0.5, "psi": 0.5, "margin": 1.0, "reduction": "token"}, "reduction"),
    ({"phi": 1.5, "psi": 0.5, "margin": 1.0}, "phi"),
    ({"phi": 0.5, "psi": -0.1, "margin": 1.0}, "psi"),
    ({"phi": 0.5, "psi": 0.5, "margin": -1.0}, "margin"),
])
def test_continuation_kd_bad_arguments(kwargs, match):
    student, teacher, labels = example()
    with pytest.raises(KDCacheError, match=match):
        continuation_kd_loss(student, teacher, labels, **kwargs)


def test_student_and_teacher_shapes_must_agree():
    student, _, labels = example()
    with pytest.raises(KDCacheError, match="shape"):
        continuation_kd_loss(student, torch.zeros(2, 4), labels, phi=0.5, psi=0.5, margin=1.0)
    with pytest.raises(KDCacheError, match="shape"):
        vanilla_kd_loss(student, torch.zeros(2, 4), labels, temperature=4, alpha=0.5)


# --- Annealing-KD -----------------------------------------------------------------------------------------

def test_annealing_kd_by_hand():
    student, teacher, _ = example()
    assert annealing_kd_loss(student, teacher, phi=0.5).item() == pytest.approx(9.0)  # mean(5, 13)
    # phi = 1: z_S - z_T = [[-1, 2, -2], [-4, -1, 3]] -> d = [9, 26]
    assert annealing_kd_loss(student, teacher, phi=1.0).item() == pytest.approx(17.5)
    # the authors' F.mse_loss averages over the C = 3 outputs too
    assert annealing_kd_loss(student, teacher, phi=1.0, mean_outputs=True).item() == pytest.approx(17.5 / 3)


@pytest.mark.parametrize("reduction,scale", [("sample", 1.0), ("batch", 1.0), ("element", 1 / 3), ("mse", 1 / 3)])
def test_annealing_stage_1_follows_the_reduction(reduction, scale):
    """--reduction element or mse makes Annealing-KD's stage 1 the authors' F.mse_loss (a mean over the outputs
    too), which is also Continuation-KD's mse hinge with m = 0 and psi = 0."""
    from kdcache.methods.annealing import AnnealingKD
    from kdcache.methods.base import MethodOptions, StepPlan

    student, teacher, labels = example()
    method = AnnealingKD(MethodOptions(reduction=reduction))
    method.run = type("R", (), {"kind": "classification"})()
    got = method.loss(student, teacher, labels, StepPlan("logits", {"stage": 1, "phi": 0.5})).item()
    assert got == pytest.approx(9.0 * scale)
    if reduction == "mse":
        assert got == pytest.approx(continuation_kd_loss(student, teacher, labels, phi=0.5, psi=0.0, margin=0.0,
                                                         reduction="mse").item())


@pytest.mark.parametrize("reduction", ["sample", "batch"])
def test_continuation_kd_with_margin_0_and_step_psi_is_annealing_kd(reduction):
    """Section 4 of the paper: m = 0 and psi = step:K (Eq. 6) turn Continuation-KD into Annealing-KD.

    Epochs 1..K are Annealing-KD's stage 1 (T annealed over those K epochs), epochs K+1..n its stage 2 (CE).
    """
    torch.manual_seed(1)
    n, k_stage1, t_max = 30, 20, 10
    student = torch.randn(8, 5, dtype=torch.float64) * 3
    teacher = torch.randn(8, 5, dtype=torch.float64) * 5
    labels = torch.tensor([0, 1, 2, 3, 4, -1, 2, 0])
    phis_seen = set()
    for i in range(1, n + 1):
        f = phi(temperature(min(i, k_stage1), k_stage1, t_max), t_max)
        got = continuation_kd_loss(student, teacher, labels, phi=f, psi=psi(f"step:{k_stage1}", i, n), margin=0.0,
                                   reduction=reduction)
        if i <= k_stage1:
            phis_seen.add(f)
            assert got.item() == pytest.approx(annealing_kd_loss(student, teacher, phi=f).item(), rel=1e-12), i
        else:
            assert got.item() == pytest.approx(ce(student, labels).item(), rel=1e-12), i
    assert min(phis_seen) == pytest.approx(0.1) and max(phis_seen) == 1.0  # T went 10 -> 1 within stage 1
