"""The examples of examples/ run as users run them (a fresh process each), on small slices: a plain PyTorch loop on
the digits cache, and KDTrainer distilling a pre-trained encoder truncated to 2 layers from the SST-2 slice's cache."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate: pip install -e '.[hf]'")


def run_example(name, *args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "examples" / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"^validation accuracy ([0-9.]+)$", done.stdout, re.M)
    assert found, done.stdout
    return float(found.group(1)), done.stdout


def test_own_loop_distils_the_digits(tmp_path, digits_cache):
    accuracy, out = run_example("own_loop.py", digits_cache, "--epochs", "3", cwd=tmp_path)
    assert [int(e) for e in re.findall(r"^epoch (\d+) ", out, re.M)] == [1, 2, 3]
    assert "'T': 2" in out  # the small preset's continuation schedule fitted to 3 epochs, as distill fits it (T_max 3)
    assert accuracy > 0.7  # ten classes: a student that learnt nothing scores about 0.1


def test_hf_trainer_example_distils_a_truncated_encoder(tmp_path, sst2_cache, sst2_copy, tiny_tokenizer):
    from teachers_for_tests import make_tiny_encoder

    encoder = make_tiny_encoder(tmp_path / "encoder", tiny_tokenizer, layers=4)
    accuracy, out = run_example("hf_trainer_sst2.py", "--cache", sst2_cache, "--data", sst2_copy, "--student",
                                encoder, "--layers", "2", "--epochs", "2", "--batch-size", "16",
                                "--out", tmp_path / "run", cwd=tmp_path)
    assert 0.0 <= accuracy <= 1.0
    saved = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert saved == ["checkpoint-8"]  # 60 rows in batches of 16, two epochs, the last checkpoint kept
    assert (tmp_path / "run" / "checkpoint-8" / "kdcache_method.pt").is_file()
    import json
    config = json.loads((tmp_path / "run" / "checkpoint-8" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
