"""The losses on sparse targets: equal to their dense siblings when nothing is dropped, exact (top-k with its tail
bucket) or unbiased (RS-KD) when something is, and refusing what they cannot compute exactly."""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.errors import KDCacheError
from kdcache.methods.losses import annealing_kd_loss, continuation_kd_loss, vanilla_kd_loss
from kdcache.methods.sparse_losses import (recorded_temperature, sampled_kd_loss, topk_annealing_kd_loss,
                                           topk_continuation_kd_loss, topk_kd_loss, topk_squared_distance,
                                           topk_teacher_log_probs)

TEMPERATURES = (1.0, 2.0, 4.0)


def logits(rows: int, outputs: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, outputs, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def topk_target(teacher: torch.Tensor, k: int, temperatures=TEMPERATURES):
    """What capture stores for a top-k row: the K largest logits descending, their ids, the lse at each T."""
    values, indices = teacher.topk(k, dim=-1)
    lse = torch.stack([torch.logsumexp(teacher / t, dim=-1) for t in temperatures], dim=-1)
    return values, indices, lse


def draw(teacher: torch.Tensor, n: int, seed: int, sample_temperature: float = 1.0, width: int | None = None):
    """What capture stores for a sampled row: unique ids of n draws from softmax(z / T_s), their counts and their
    T = 1 log-probs, at a fixed width with unused slots at count 0 (their id and log-prob set to junk)."""
    rows, outputs = teacher.shape
    width = width or n
    generator = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(torch.softmax(teacher / sample_temperature, -1), n, replacement=True,
                              generator=generator)
    counts_full = torch.zeros(rows, outputs, dtype=torch.long).scatter_add_(1, draws, torch.ones_like(draws))
    order = counts_full.argsort(dim=-1, descending=True, stable=True)[:, :width]
    counts = counts_full.gather(1, order)
    log_p = torch.log_softmax(teacher, -1).gather(1, order)
    ids = torch.where(counts > 0, order, torch.full_like(order, 0))
    log_p = torch.where(counts > 0, log_p, torch.full_like(log_p, 123.0))  # junk: must be ignored
    return ids, counts, log_p


def full_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    log_p = torch.log_softmax(teacher / temperature, -1)
    log_q = torch.log_softmax(student / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def value_and_grad(fn, student: torch.Tensor) -> tuple[float, torch.Tensor]:
    student = student.detach().clone().requires_grad_(True)
    loss = fn(student)
    loss.backward()
    return loss.item(), student.grad


def assert_same(dense, sparse, student: torch.Tensor) -> None:
    want, want_grad = value_and_grad(dense, student)
    got, got_grad = value_and_grad(sparse, student)
    assert got == pytest.approx(want, abs=1e-6)
    assert torch.allclose(got_grad, want_grad, rtol=0, atol=1e-6)
    assert want_grad.abs().sum() > 0


# --- K = C: every sparse loss is its dense sibling, gradients included ---------------------------------------

@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("tail", ["bucket", "renormalised"])
def test_topk_kd_at_k_equal_c_is_vanilla_kd(temperature, alpha, tail):
    student, teacher, labels = logits(6, 5, 0), logits(6, 5, 1), torch.tensor([0, 4, -1, 2, 3, 1])
    values, indices, lse = topk_target(teacher, 5)
    assert_same(lambda s: vanilla_kd_loss(s, teacher, labels, temperature=temperature, alpha=alpha),
                lambda s: topk_kd_loss(s, values, indices, lse, labels, temperature=temperature,
                                       temperatures=TEMPERATURES, alpha=alpha, tail=tail),
                student)


@pytest.mark.parametrize("reduction", ["sample", "batch", "element", "mse"])
@pytest.mark.parametrize("margin", [0.0, 20.0])
@pytest.mark.parametrize("psi", [0.0, 0.4])
def test_topk_continuation_at_k_equal_c_is_continuation_kd(reduction, margin, psi):
    student, teacher, labels = logits(6, 5, 2), logits(6, 5, 3), torch.tensor([0, 4, -1, 2, 3, 1])
    values, indices, _ = topk_target(teacher, 5)
    if reduction in ("element", "mse"):
        margin /= 5
    kwargs = dict(phi=0.6, psi=psi, margin=margin, reduction=reduction, phi_margin=0.8)
    assert_same(lambda s: continuation_kd_loss(s, teacher, labels, **kwargs),
                lambda s: topk_continuation_kd_loss(s, values, indices, labels, **kwargs),
                student)


@pytest.mark.parametrize("mean_outputs", [False, True])
def test_topk_annealing_at_k_equal_c_is_annealing_kd(mean_outputs):
    student, teacher = logits(6, 5, 4), logits(6, 5, 5)
    values, indices, _ = topk_target(teacher, 5)
    assert_same(lambda s: annealing_kd_loss(s, teacher, phi=0.3, mean_outputs=mean_outputs),
                lambda s: topk_annealing_kd_loss(s, values, indices, phi=0.3, mean_outputs=mean_outputs),
                student)


def test_a_sample_listing_every_output_once_at_a_uniform_proposal_is_the_full_kl():
    """The sampled loss's K = C: each id drawn once, from a proposal flat enough (T_s -> inf) to be uniform, so
    the importance weights p_i^(1 - 1/T_s), normalised, are p itself and the estimate is KL(p || q) exactly."""
    student, teacher, labels = logits(6, 5, 6), logits(6, 5, 7), torch.tensor([0, 4, -1, 2, 3, 1])
    ids = torch.arange(5).repeat(6, 1)
    counts = torch.ones(6, 5, dtype=torch.long)
    log_p = torch.log_softmax(teacher, -1)
    assert_same(lambda s: vanilla_kd_loss(s, teacher, labels, temperature=1.0, alpha=0.3),
                lambda s: sampled_kd_loss(s, ids, counts, log_p, labels, alpha=0.3, sample_temperature=1e12),
                student)


# --- top-k: the tail bucket is exact ------------------------------------------------------------------------

def merged_kl(student: torch.Tensor, teacher: torch.Tensor, indices: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL over the K kept outputs plus one bucket merging the rest, from the full logits of both."""
    p = torch.softmax(teacher / temperature, -1)
    q = torch.softmax(student / temperature, -1)
    unkept = torch.ones_like(p, dtype=torch.bool).scatter(1, indices, False)
    p_merged = torch.cat([p.gather(1, indices), (p * unkept).sum(-1, keepdim=True)], dim=-1)
    q_merged = torch.cat([q.gather(1, indices), (q * unkept).sum(-1, keepdim=True)], dim=-1)
    return temperature ** 2 * (p_merged * (p_merged.log() - q_merged.log())).sum(-1).mean()


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_the_tail_bucket_is_the_exact_merged_kl(temperature, k):
    student, teacher, labels = logits(8, 7, 8), logits(8, 7, 9), torch.full((8,), -1)
    values, indices, lse = topk_target(teacher, k)
    assert_same(lambda s: merged_kl(s, teacher, indices, temperature),
                lambda s: topk_kd_loss(s, values, indices, lse, labels, temperature=temperature,
                                       temperatures=TEMPERATURES, alpha=0.0),
                student)
    # merging outcomes loses information: never more than the full KL
    sparse = topk_kd_loss(student, values, indices, lse, labels, temperature=temperature, temperatures=TEMPERATURES,
                          alpha=0.0)
    assert sparse.item() <= temperature ** 2 * full_kl(student, teacher, temperature).item() + 1e-12


def test_the_teacher_tail_is_exact_in_log_space_down_to_the_precision_of_the_log_sum_exp():
    """A tail of 1e-9 in float64 comes out to 7 digits; one below float64's epsilon next to 1 (1e-17) cannot be
    told from 0: it reads as an empty bucket, and the loss stays finite."""
    teacher = torch.tensor([[20.0, 19.0, 0.0, -1.0, -2.0]], dtype=torch.float64)
    values, indices, lse = topk_target(teacher, 2)
    log_kept, log_tail = topk_teacher_log_probs(values, lse[:, 0], 1.0)
    exact_tail = torch.logsumexp(teacher[:, 2:], -1) - torch.logsumexp(teacher, -1)
    assert exact_tail.exp().item() == pytest.approx(2.3e-9, rel=0.1)
    assert log_tail.item() == pytest.approx(exact_tail.item(), abs=1e-6)
    assert torch.allclose(log_kept, torch.log_softmax(teacher, -1)[:, :2])
    tiny = teacher * 2  # tail mass about 1e-17
    values, indices, lse = topk_target(tiny, 2)
    assert topk_teacher_log_probs(values, lse[:, 0], 1.0)[1].item() == -math.inf
    student = torch.zeros(1, 5, dtype=torch.float64, requires_grad=True)
    loss = topk_kd_loss(student, values, indices, lse, torch.tensor([-1]), temperature=1.0,
                        temperatures=TEMPERATURES, alpha=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(merged_kl(student.detach(), tiny, indices, 1.0).item(), rel=1e-9)
    assert torch.isfinite(student.grad).all()


def test_the_renormalised_variant_is_biased_when_the_tail_is_heavy():
    """DistillKit's renormalisation cannot see the tail: a student that matches the kept ratios and puts no mass
    in the tail scores 0 under it, though the teacher gives the tail half its mass. The bucket sees it."""
    teacher = torch.tensor([[2.0, 1.0] + [math.log(math.e ** 2 + math.e) - math.log(8)] * 8], dtype=torch.float64)
    values, indices, lse = topk_target(teacher, 2)
    _, log_tail = topk_teacher_log_probs(values, lse[:, 0], 1.0)
    assert log_tail.exp().item() == pytest.approx(0.5)
    student = torch.tensor([[2.0, 1.0] + [-30.0] * 8], dtype=torch.float64)
    labels = torch.tensor([-1])
    common = dict(temperature=1.0, temperatures=TEMPERATURES, alpha=0.0)
    renormalised = topk_kd_loss(student, values, indices, lse, labels, tail="renormalised", **common).item()
    bucket = topk_kd_loss(student, values, indices, lse, labels, tail="bucket", **common).item()
    assert renormalised == pytest.approx(0.0, abs=1e-12)
    assert bucket == pytest.approx(merged_kl(student, teacher, indices, 1.0).item(), rel=1e-9) and bucket > 5.0
    # with a light tail the two nearly agree
    light = torch.tensor([[9.0, 8.0] + [0.0] * 8], dtype=torch.float64)
    values, indices, lse = topk_target(light, 2)
    renormalised = topk_kd_loss(student, values, indices, lse, labels, tail="renormalised", **common).item()
    bucket = topk_kd_loss(student, values, indices, lse, labels, tail="bucket", **common).item()
    assert bucket - renormalised == pytest.approx(0.0, abs=0.05) and bucket > renormalised


def test_float16_values_that_round_the_kept_mass_above_1_stay_finite():
    teacher = torch.tensor([[12.0, 11.97, 11.93, -20.0]], dtype=torch.float32)
    values, indices, lse = topk_target(teacher, 3, temperatures=(1.0,))
    values = values.half()  # 11.97 -> 11.96875, 11.93 -> 11.9296875: the kept mass rounds to >= 1
    student = torch.zeros(1, 4, requires_grad=True)
    loss = topk_kd_loss(student, values, indices, lse[:, 0].float(), torch.tensor([-1]), temperature=1.0,
                        temperatures=(1.0,), alpha=0.0)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item()) and torch.isfinite(student.grad).all()
    want = merged_kl(student.detach().double(), teacher.double(), indices, 1.0).item()
    assert loss.item() == pytest.approx(want, abs=1e-2)


def test_a_student_tail_below_float32s_range_is_still_exact():
    """The student's tail is a log-sum-exp over its unkept outputs, not log(1 - sum q_k): a tail of e^-100
    (under float32's smallest normal) still gives the finite, exact loss."""
    teacher = torch.tensor([[2.0, 1.0, 1.0, 0.5]])
    values, indices, lse = topk_target(teacher, 2, temperatures=(1.0,))
    student = torch.tensor([[100.0, 100.0, 0.0, 0.0]], requires_grad=True)
    loss = topk_kd_loss(student, values, indices, lse, torch.tensor([-1]), temperature=1.0, temperatures=(1.0,),
                        alpha=0.0)
    loss.backward()
    want = merged_kl(student.detach().double(), teacher.double(), indices, 1.0).item()
    assert loss.item() == pytest.approx(want, rel=1e-5) and want > 25
    assert torch.isfinite(student.grad).all()


# --- top-k: temperatures ------------------------------------------------------------------------------------

def test_a_temperature_that_was_not_recorded_is_refused_listing_the_recorded_ones():
    student, teacher = logits(3, 6, 10), logits(3, 6, 11)
    values, indices, lse = topk_target(teacher, 2)
    with pytest.raises(KDCacheError, match=r"temperature 3 was not recorded .*\(recorded: 1, 2, 4\)") as error:
        topk_kd_loss(student, values, indices, lse, torch.full((3,), -1), temperature=3.0, temperatures=TEMPERATURES,
                     alpha=0.0)
    assert "\n" not in str(error.value)
    # refused before anything is computed, even when only the label term would be
    with pytest.raises(KDCacheError, match="not recorded"):
        topk_kd_loss(student, values, indices, lse, torch.zeros(3, dtype=torch.long), temperature=3.0,
                     temperatures=TEMPERATURES, alpha=1.0)
    # the renormalised variant reads no log-sum-exp: any T, and none need be stored
    loss = topk_kd_loss(student, values, indices, None, torch.full((3,), -1), temperature=3.0, alpha=0.0,
                        tail="renormalised")
    assert loss.item() > 0
    with pytest.raises(KDCacheError, match="exact tail needs the cache's logsumexp"):
        topk_kd_loss(student, values, indices, None, torch.full((3,), -1), temperature=1.0, alpha=0.0)


def test_each_temperature_reads_its_own_column_and_a_1d_logsumexp_is_t_1():
    student, teacher, labels = logits(4, 6, 12), logits(4, 6, 13), torch.full((4,), -1)
    values, indices, lse = topk_target(teacher, 3)
    assert recorded_temperature(TEMPERATURES, 4.0) == 2
    at_4 = topk_kd_loss(student, values, indices, lse, labels, temperature=4.0, temperatures=TEMPERATURES, alpha=0.0)
    assert at_4.item() == pytest.approx(merged_kl(student, teacher, indices, 4.0).item(), rel=1e-12)
    at_1 = topk_kd_loss(student, values, indices, lse[:, 0], labels, temperature=1.0, temperatures=[1.0], alpha=0.0)
    assert at_1.item() == pytest.approx(merged_kl(student, teacher, indices, 1.0).item(), rel=1e-12)
    with pytest.raises(KDCacheError, match="logsumexp"):  # 3 columns, 1 temperature named
        topk_kd_loss(student, values, indices, lse, labels, temperature=1.0, temperatures=[1.0], alpha=0.0)


# --- RS-KD: the sampled estimate is unbiased ----------------------------------------------------------------

def test_the_rs_kd_estimate_is_unbiased_over_sampling_seeds():
    """Mean over 4,000 independent draws of N = 8 ids: the loss within 4 standard errors of KL(p || q), and its gradient
    within 5 standard errors of the full gradient q - p (per output, sd sqrt(p (1 - p) / N) per seed)."""
    rows, outputs, n, groups, per_group = 2, 10, 8, 40, 100
    teacher, student_row = logits(rows, outputs, 14, 1.5), logits(rows, outputs, 15, 1.5)
    kl = full_kl(student_row, teacher).item()
    student = student_row.clone().requires_grad_(True)
    group_means = []
    for group in range(groups):
        # per_group independent draws of each row, all from one generator seeded per group
        ids, counts, log_p = draw(teacher.repeat(per_group, 1), n, 1000 + group)
        batch = student.repeat(per_group, 1)
        loss = sampled_kd_loss(batch, ids, counts, log_p, torch.full((rows * per_group,), -1), alpha=0.0)
        (loss / groups).backward()
        group_means.append(loss.item())
    means = torch.tensor(group_means, dtype=torch.float64)
    standard_error = means.std().item() / math.sqrt(groups)
    assert abs(means.mean().item() - kl) < 4 * standard_error
    assert standard_error < 0.1 * kl  # the test has power: a bias of 0.4 KL would fail it
    p, q = torch.softmax(teacher, -1), torch.softmax(student_row, -1)
    seeds = groups * per_group
    gradient_se = (p * (1 - p) / n / seeds).sqrt() / rows
    assert ((student.grad - (q - p) / rows).abs() < 5 * gradient_se + 1e-12).all()


@pytest.mark.parametrize("sample_temperature", [0.5, 2.0])
def test_the_self_normalised_estimate_at_another_sample_temperature_approaches_the_kl_as_n_grows(sample_temperature):
    teacher, student = logits(4, 12, 16, 1.5), logits(4, 12, 17, 1.5)
    kl = full_kl(student, teacher).item()
    labels = torch.full((4,), -1)

    def mean_error(n: int) -> float:
        errors = [sampled_kd_loss(student, *draw(teacher, n, seed, sample_temperature), labels, alpha=0.0,
                                  sample_temperature=sample_temperature).item() - kl for seed in range(20)]
        return sum(abs(e) for e in errors) / len(errors)

    small, large = mean_error(20), mean_error(20_000)
    assert large < 0.02 * kl and large < small / 5
    # the weights matter: the same draws read as if T_s were 1 converge to something else
    ids, counts, log_p = draw(teacher, 20_000, 0, sample_temperature)
    unweighted = sampled_kd_loss(student, ids, counts, log_p, labels, alpha=0.0).item()
    assert abs(unweighted - kl) > 0.1 * kl


# --- Continuation-KD on the kept support --------------------------------------------------------------------

def test_the_sparse_distance_is_exact_on_the_kept_ids_and_pushes_down_only_above_the_smallest_kept_value():
    teacher = torch.tensor([[4.0, 3.0, 1.0, 0.0]], dtype=torch.float64)
    values, indices, _ = topk_target(teacher, 2)  # kept 4, 3; v_K = 3, phi v_K = 1.5 at phi = 0.5
    student = torch.tensor([[2.0, 1.0, 2.5, -7.0]], dtype=torch.float64, requires_grad=True)
    distance = topk_squared_distance(student, values, indices, 0.5)
    # kept: (2 - 2)^2 + (1 - 1.5)^2 = 0.25; unkept: relu(2.5 - 1.5)^2 + relu(-7 - 1.5)^2 = 1
    assert distance.item() == pytest.approx(1.25)
    distance.sum().backward()
    assert student.grad.tolist() == [[0.0, -1.0, 2.0, 0.0]]  # output 3 claims less than the teacher could: free
    dense = ((student.detach() - 0.5 * teacher) ** 2).sum().item()
    assert distance.item() <= dense


@pytest.mark.parametrize("k", [1, 3, 7])
def test_the_sparse_distance_never_exceeds_the_dense_one(k):
    student, teacher = logits(16, 8, 18), logits(16, 8, 19)
    values, indices, _ = topk_target(teacher, k)
    for phi_ in (0.1, 0.5, 1.0):
        sparse = topk_squared_distance(student, values, indices, phi_)
        dense = ((student - phi_ * teacher) ** 2).sum(-1)
        assert (sparse <= dense + 1e-12).all()


def test_annealing_is_continuation_with_margin_0_on_a_sparse_target():
    student, teacher, labels = logits(5, 9, 20), logits(5, 9, 21), torch.tensor([0, 1, 2, 3, 4])
    values, indices, _ = topk_target(teacher, 3)
    for reduction, mean_outputs in (("sample", False), ("mse", True)):
        hinge = topk_continuation_kd_loss(student, values, indices, labels, phi=0.4, psi=0.0, margin=0.0,
                                          reduction=reduction)
        anneal = topk_annealing_kd_loss(student, values, indices, phi=0.4, mean_outputs=mean_outputs)
        assert hinge.item() == pytest.approx(anneal.item(), rel=1e-12)


# --- masks and token-level rows ------------------------------------------------------------------------------

def sparse_losses(student, teacher, labels, mask, k=3):
    """Every sparse loss on one batch, with the same mask."""
    values, indices, lse = topk_target(teacher, k)
    ids, counts, log_p = draw(teacher, 6, 0, width=6)
    return {
        "topk": topk_kd_loss(student, values, indices, lse, labels, temperature=2.0, temperatures=TEMPERATURES,
                             alpha=0.3, mask=mask),
        "renormalised": topk_kd_loss(student, values, indices, lse, labels, temperature=2.0,
                                     temperatures=TEMPERATURES, alpha=0.3, tail="renormalised", mask=mask),
        "sampled": sampled_kd_loss(student, ids, counts, log_p, labels, alpha=0.3, mask=mask),
        "sampled_ts": sampled_kd_loss(student, ids, counts, log_p, labels, alpha=0.3, sample_temperature=2.0,
                                      mask=mask),
        **{f"continuation_{r}": topk_continuation_kd_loss(student, values, indices, labels, phi=0.5, psi=0.3,
                                                          margin=2.0, reduction=r, mask=mask)
           for r in ("sample", "batch", "element", "mse")},
        "annealing": topk_annealing_kd_loss(student, values, indices, phi=0.5, mask=mask),
    }


def test_token_level_rows_with_a_mask_are_the_losses_of_the_valid_positions_alone():
    """(batch = 2, positions = 5) flattened to 10 rows; the padded positions (and their labels) are dropped:
    the same losses as on the 7 valid rows alone, and no gradient reaches a padded position."""
    batch, positions, outputs = 2, 5, 11
    student = logits(batch * positions, outputs, 22).reshape(batch, positions, outputs)
    teacher = logits(batch * positions, outputs, 23).reshape(batch, positions, outputs)
    labels = torch.randint(0, outputs, (batch, positions), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([5, 2])
    mask = torch.arange(positions).unsqueeze(0) < lengths.unsqueeze(1)  # (batch, positions)
    rows = student.reshape(-1, outputs).clone().requires_grad_(True)
    flat_mask = mask.reshape(-1)
    masked = sparse_losses(rows, teacher.reshape(-1, outputs), labels.reshape(-1), flat_mask)
    valid = sparse_losses(student.reshape(-1, outputs)[flat_mask], teacher.reshape(-1, outputs)[flat_mask],
                          labels.reshape(-1)[flat_mask], None)
    for name, loss in masked.items():
        if name.startswith("sampled"):
            continue  # its draws depend on the rows drawn for: checked below with the same draws
        assert loss.item() == pytest.approx(valid[name].item(), rel=1e-12), name
        rows.grad = None
        loss.backward()
        assert rows.grad[~flat_mask].abs().sum() == 0 and rows.grad[flat_mask].abs().sum() > 0, name


def test_a_mask_drops_sampled_rows_and_their_labels():
    student, teacher = logits(6, 9, 24), logits(6, 9, 25)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    ids, counts, log_p = draw(teacher, 7, 3)
    mask = torch.tensor([True, False, True, True, False, True])
    for ts in (1.0, 2.0):
        masked = sampled_kd_loss(student, ids, counts, log_p, labels, alpha=0.3, sample_temperature=ts, mask=mask)
        alone = sampled_kd_loss(student[mask], ids[mask], counts[mask], log_p[mask], labels[mask], alpha=0.3,
                                sample_temperature=ts)
        assert masked.item() == pytest.approx(alone.item(), rel=1e-12)


def test_a_mask_that_keeps_no_row_gives_0_and_a_graph():
    student, teacher = logits(4, 6, 26).requires_grad_(True), logits(4, 6, 27)
    nothing = torch.zeros(4, dtype=torch.bool)
    for name, loss in sparse_losses(student, teacher, torch.tensor([0, 1, 2, 3]), nothing).items():
        assert loss.item() == 0.0, name
        student.grad = None
        loss.backward()
        assert torch.equal(student.grad, torch.zeros_like(student)), name


# --- bad input ----------------------------------------------------------------------------------------------

def test_bad_shapes_and_options_are_one_line_errors():
    student, teacher, labels = logits(4, 6, 28), logits(4, 6, 29), torch.full((4,), -1)
    values, indices, lse = topk_target(teacher, 3)
    common = dict(temperature=1.0, temperatures=TEMPERATURES, alpha=0.0)
    cases = [
        (lambda: topk_kd_loss(student, values, indices, lse, labels, tail="uniform", **common), "tail"),
        (lambda: topk_kd_loss(student[:3], values, indices, lse, labels, **common), "rows"),
        (lambda: topk_kd_loss(student, values[:, :2], indices, lse, labels, **common), "differ in shape"),
        (lambda: topk_kd_loss(student[:, :2], values, indices, lse, labels, **common), "keeps 3 ids"),
        (lambda: topk_kd_loss(student, values, indices, lse, labels, mask=torch.ones(4), **common), "mask"),
        (lambda: topk_kd_loss(student.reshape(2, 2, 6), values, indices, lse, labels, **common), "flatten"),
        (lambda: topk_continuation_kd_loss(student, values, indices, labels, phi=0.5, psi=0.0, margin=1.0,
                                           reduction="token"), "reduction"),
        (lambda: topk_continuation_kd_loss(student, values, indices, labels, phi=1.5, psi=0.0, margin=1.0), "phi"),
        (lambda: sampled_kd_loss(student, indices, indices, values, labels, alpha=0.0, sample_temperature=0.0),
         "sample temperature"),
    ]
    for call, match in cases:
        with pytest.raises(KDCacheError, match=match) as error:
            call()
        assert "\n" not in str(error.value)
