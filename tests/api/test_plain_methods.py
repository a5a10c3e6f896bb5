"""`kdcache.methods.get`: a method as a plain object, the very `Method` distill runs (same defaults, schedules and
losses), its loss read from the `teacher_*` keys `with_targets` serves, for every kind of target a cache stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache import open_cache
from kdcache.errors import KDCacheError
from kdcache.methods import get, losses, schedules, sparse_losses
from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
from kdcache.recipes.demo import train_digits_teacher
from kdcache.torch import with_targets


@pytest.fixture(scope="module")
def sparse_caches(tmp_path_factory):
    """The digits teacher cached as top-3 rows (T = 1 and 4 recorded) and as 30 samples per row."""
    root = tmp_path_factory.mktemp("plain")
    train_digits_teacher(root / "teacher", epochs=2)
    return {kind: cache_teacher(CacheTeacherConfig(teacher=str(root / "teacher"), task="digits",
                                                   out=root / f"{kind}.kdcache", splits=("train",), device="cpu",
                                                   progress=False, **extra))
            for kind, extra in (("topk", {"topk": 3, "lse_temperatures": (1.0, 4.0)}),
                                ("sampled", {"sample_tokens": 30}))}


def digits_rows():
    from kdcache.data import load_split

    split = load_split("digits", None, "train")
    return [{"image": split.dataset[i]["inputs"], "label": split.dataset[i]["label"]} for i in range(len(split))]


def test_continuation_values_follow_the_papers_glue_schedule():
    method = get("continuation", preset="glue", epochs=30)
    assert method.hyperparameters["t_max"] == 10 and method.hyperparameters["psi"] == "glue"
    for epoch in (1, 7, 30):
        T = schedules.temperature(epoch, 30, 10)
        assert method.values(epoch) == {"T": T, "phi": schedules.phi(T, 10), "psi": schedules.psi("glue", epoch, 30)}
    assert method.values(1)["T"] == 10 and method.values(30)["T"] == 1


def test_the_loss_is_distills_loss_at_the_epochs_values():
    torch.manual_seed(0)
    output, teacher, labels = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    method = get("continuation", preset="cifar", epochs=10, margin=0.5)
    v = method.values(4)
    expected = losses.continuation_kd_loss(output, teacher, labels, phi=v["phi"], psi=v["psi"], margin=0.5)
    assert torch.equal(method.loss(output, {"teacher_logits": teacher}, labels, epoch=4), expected)
    assert torch.equal(method.loss(output, teacher, labels, epoch=4), expected)
    assert not torch.equal(method.loss(output, teacher, labels, epoch=9), expected)  # the schedule moved


def test_annealing_and_vanilla_expose_their_values():
    annealing = get("annealing", preset="glue", epochs=13)
    assert annealing.hyperparameters["anneal_epochs"] == 10 and annealing.restart_epochs() == (11,)
    assert annealing.values(10)["stage"] == 1 and annealing.values(11) == {"stage": 2, "T": 1, "phi": 1.0, "psi": 1.0}
    assert get("vanilla", epochs=3, temperature=2.0, alpha=0.25).values(2) == {"T": 2.0, "alpha": 0.25}
    steps = get("continuation", epochs=2, steps_per_epoch=5, unit="step", t_max=4)
    assert [steps.values(1, s)["T"] for s in range(10)] == [schedules.temperature(s + 1, 10, 4) for s in range(10)]


def test_top_k_rows_from_with_targets_give_the_sparse_loss(sparse_caches):
    cache = open_cache(sparse_caches["topk"])
    data = with_targets(digits_rows(), cache)
    batch = data.collate([data[i] for i in range(8)])
    assert set(k for k in batch if k.startswith("teacher_")) == {"teacher_topk_values", "teacher_topk_indices",
                                                                  "teacher_logsumexp", "teacher_row"}
    assert batch["teacher_topk_values"].shape == (8, 3) and batch["teacher_logsumexp"].shape == (8, 2)
    method = get("vanilla", preset="small", epochs=2, cache=cache, temperature=4.0)
    output = torch.randn(8, 10)
    expected = sparse_losses.topk_kd_loss(output, batch["teacher_topk_values"].float(),
                                          batch["teacher_topk_indices"].long(), batch["teacher_logsumexp"].float(),
                                          batch["labels"], temperature=4.0, temperatures=(1.0, 4.0), alpha=0.5)
    assert torch.allclose(method.loss(output, batch, batch["labels"], epoch=1), expected)


def test_sampled_rows_serve_vanilla_and_refuse_continuation(sparse_caches):
    cache = open_cache(sparse_caches["sampled"])
    data = with_targets(digits_rows(), cache)
    batch = data.collate([data[i] for i in range(4)])
    counts = batch["teacher_sampled_counts"]
    assert (counts.sum(1) == 30).all()
    loss = get("vanilla", preset="small", epochs=1, cache=cache).loss(torch.randn(4, 10), batch, batch["labels"],
                                                                      epoch=1)
    assert torch.isfinite(loss)
    with pytest.raises(KDCacheError, match="stores sampled ids .*but --method continuation needs dense logits"):
        get("continuation", epochs=3, cache=cache)


def test_bad_requests_are_one_line(sst2_cache):
    cache = open_cache(sst2_cache)
    method = get("continuation", epochs=3, cache=cache)
    with pytest.raises(KDCacheError, match="the student has 3 outputs but the cache .*'s teacher has 2"):
        method.loss(torch.randn(4, 3), {"teacher_logits": torch.randn(4, 2)}, torch.zeros(4, dtype=torch.long),
                    epoch=1)
    with pytest.raises(KDCacheError, match="the batch has no teacher_logits"):
        method.loss(torch.randn(4, 2), {"input_ids": torch.zeros(4, 2)}, torch.zeros(4, dtype=torch.long), epoch=1)
    with pytest.raises(KDCacheError, match="epoch 4 is outside the run's epochs 1..3"):
        method.values(4)
    with pytest.raises(KDCacheError, match="takes no option tmax"):
        get("continuation", epochs=3, tmax=4)
    with pytest.raises(KDCacheError, match="--method 'distil' is not one of"):
        get("distil", epochs=3)
    with pytest.raises(KDCacheError, match="curriculum extraction taps the student's layers"):
        get("curriculum", epochs=3)
    with pytest.raises(KDCacheError, match="reads the cache's teacher checkpoints"):
        get("prokd", epochs=3)
    with pytest.raises(KDCacheError, match="stores no teacher checkpoints"):
        get("prokd", epochs=3, cache=cache)


def test_method_state_round_trips_and_refuses_another_run():
    annealing = get("annealing", preset="small", epochs=3)
    model = torch.nn.Linear(2, 2)
    annealing.end_epoch(1, model, 0.7)
    state = annealing.state_dict()
    fresh = get("annealing", preset="small", epochs=3)
    fresh.load_state_dict(state)
    assert fresh.method.stage1_best["metric"] == 0.7
    with pytest.raises(KDCacheError, match="the saved method state is annealing over 3 epochs, not annealing over 4"):
        get("annealing", preset="small", epochs=4).load_state_dict(state)
    assert np.isfinite(annealing.values(3)["phi"])


def test_every_name_docs_python_api_lists_is_there():
    """docs/python-api.md's table is the public API: each name it lists resolves (a renamed one fails here)."""
    import importlib
    import re

    from helpers import REPO

    doc = (REPO / "docs" / "python-api.md").read_text()
    table = doc.split("## `kdcache.torch.with_targets`")[0]
    names = sorted(set(re.findall(r"`(kdcache(?:\.\w+)+)", table)))
    assert "kdcache.torch.with_targets" in names and "kdcache.hf.KDTrainer" in names and "kdcache.methods.get" in names
    for name in names:
        module, _, attr = name.rpartition(".")
        if module == "kdcache":
            assert hasattr(importlib.import_module("kdcache"), attr), name
        else:
            assert hasattr(importlib.import_module(module), attr), name
