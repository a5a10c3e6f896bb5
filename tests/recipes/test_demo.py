"""The main job (`kdcache demo`): every method, Pro-KD and curriculum extraction included, from one cache."""

from __future__ import annotations

from kdcache.recipes.demo import DEMO_METHODS, run_demo
from helpers import run_cli


def test_demo_trains_one_student_per_method_from_one_cache(tmp_path):
    result = run_demo(tmp_path, epochs=10, student_epochs=6)
    assert [r["run"] for r in result["runs"]] == ["train (no cache)", *(f"distill {m}" for m in DEMO_METHODS)]
    assert {"prokd", "curriculum"} <= set(DEMO_METHODS)
    cache = result["cache"]
    assert [(c["name"], c["array"]) for c in cache["checkpoints"]] == [("epoch-0005", "checkpoint_0"),
                                                                        ("teacher", "logits")]
    assert cache["hidden_projections"]["dim"] == 32 and cache["hidden_projections"]["layers"] == [2]
    scratch, ce = result["runs"][0], result["runs"][1]
    assert scratch["best_accuracy"] == ce["best_accuracy"]  # train and distill --method ce: the same loop
    assert all(0.5 < r["best_accuracy"] <= 1 for r in result["runs"])


def test_demo_command_prints_the_cache_and_the_table(tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["demo", "--workdir", tmp_path, "--epochs", "6", "--student-epochs", "3"], capsys,
                             monkeypatch)
    assert code == 0, err
    assert "checkpoint  epoch-0005  epoch 5" in out and "hidden   layers 2 projected to 32 dims" in out
    assert "distill curriculum" in out and "distill prokd" in out


def test_demo_trains_on_one_thread_and_gives_the_callers_threads_back(tmp_path, monkeypatch):
    """Its models are tiny: on a busy machine, intra-op threads only wait on each other."""
    import torch

    import kdcache.recipes.demo as demo

    seen, real = [], demo.distill

    def counting(cfg):
        seen.append(torch.get_num_threads())
        return real(cfg)

    monkeypatch.setattr(demo, "distill", counting)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_demo(tmp_path, epochs=3, student_epochs=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
